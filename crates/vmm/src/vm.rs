//! The virtual machine: KVM, guest memory, devices and vCPUs tied together, and its
//! lifecycle (running, paused, shut down).
//!
//! [`Vm::create`] builds everything and loads the kernel; [`Vm::start`] starts the
//! vCPU threads; [`Vm::run`] runs the event loop (queue notifications, serial input)
//! on the calling thread until the guest powers off or resets, an internal error
//! stops it without a monitor, or the host asks it to quit. The shared [`VmCore`]
//! is what the QMP commands act on: `stop` parks every vCPU, stops the devices
//! (waiting for the requests in flight) and flushes the disks; `cont` undoes that.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use strata_qmp::EventSender;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{self, BootSpec};
use crate::devices::block::{Disk, DiskConfig};
use crate::devices::ged::Ged;
use crate::devices::serial::{Output, SerialDevice, StdinInput};
use crate::devices::{Bus, MmioSlot};
use crate::layout::{
    virtio_mmio_addr, virtio_mmio_gsi, COM1_GSI, GED_GSI, GED_MMIO_ADDR, VIRTIO_MMIO_MAX,
    VIRTIO_MMIO_SIZE,
};
use crate::memory::{self, GuestMemory};
use crate::vcpu::{self, VcpuThread};

/// Most vCPUs accepted.
pub const MAX_VCPUS: u8 = 64;

/// QEMU's `RunState` values this VMM can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// The vCPUs run.
    Running,
    /// Started with `-S` and not continued yet.
    Prelaunch,
    /// Stopped by `stop`.
    Paused,
    /// Stopped by a disk's error policy (`werror=stop`/`enospc`, `rerror=stop`).
    IoError,
    /// The guest is shutting down or has shut down.
    Shutdown,
    /// KVM could not continue the guest.
    InternalError,
}

impl RunState {
    /// The QMP spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Prelaunch => "prelaunch",
            RunState::Paused => "paused",
            RunState::IoError => "io-error",
            RunState::Shutdown => "shutdown",
            RunState::InternalError => "internal-error",
        }
    }
}

/// Why the VM is going away (QEMU's `ShutdownCause`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShutdownCause {
    /// The guest powered off.
    GuestShutdown,
    /// The guest reset (the VMM exits instead of rebooting, like QEMU's `-no-reboot`).
    GuestReset,
    /// `quit` on the monitor.
    HostQmpQuit,
    /// SIGTERM or SIGINT.
    HostSignal,
    /// KVM failed and no monitor is there to look at it.
    InternalError(String),
}

impl ShutdownCause {
    /// The `reason` of the `SHUTDOWN` event.
    pub fn reason(&self) -> &'static str {
        match self {
            ShutdownCause::GuestShutdown => "guest-shutdown",
            ShutdownCause::GuestReset => "guest-reset",
            ShutdownCause::HostQmpQuit => "host-qmp-quit",
            ShutdownCause::HostSignal => "host-signal",
            ShutdownCause::InternalError(_) => "guest-panic",
        }
    }

    /// Whether the guest caused it.
    pub fn guest(&self) -> bool {
        matches!(
            self,
            ShutdownCause::GuestShutdown | ShutdownCause::GuestReset
        )
    }
}

/// What a vCPU reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// ACPI S5.
    PowerOff,
    /// ACPI reset register, triple fault or KVM reset event.
    Reset,
    /// KVM failed.
    InternalError(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Exit,
}

struct CtlState {
    want: Want,
    parked: usize,
    exit: Option<ShutdownCause>,
    internal_error: Option<String>,
    /// Bumped by every reset; a vCPU that sees a new value reloads its state.
    reset_epoch: u64,
    /// Where the boot vCPU enters after the latest reset.
    reset_entry: Option<boot::BootEntry>,
    /// The guest asked for a reset (handled by the event loop).
    guest_reset: bool,
}

/// The rendezvous between the vCPU threads and whoever pauses, resumes or ends them.
pub struct Control {
    st: Mutex<CtlState>,
    cv: Condvar,
    wake: EventFd,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Control")
    }
}

impl Control {
    fn new(paused: bool) -> std::io::Result<Self> {
        Ok(Control {
            st: Mutex::new(CtlState {
                want: if paused { Want::Pause } else { Want::Run },
                parked: 0,
                exit: None,
                internal_error: None,
                reset_epoch: 0,
                reset_entry: None,
                guest_reset: false,
            }),
            cv: Condvar::new(),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a vCPU thread before each `KVM_RUN`: waits while the VM is paused.
    /// Returns `None` when the thread must end, otherwise the reset epoch and the
    /// boot entry of the latest reset.
    pub fn park_if_paused(&self) -> Option<(u64, Option<boot::BootEntry>)> {
        let mut s = self.lock();
        if s.want == Want::Pause {
            s.parked += 1;
            self.cv.notify_all();
            while s.want == Want::Pause {
                s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.parked -= 1;
        }
        match s.want {
            Want::Exit => None,
            _ => Some((s.reset_epoch, s.reset_entry)),
        }
    }

    /// A vCPU reports a guest power event or a KVM failure.
    pub fn guest_exit(&self, e: GuestExit) {
        match e {
            GuestExit::PowerOff => self.request_shutdown(ShutdownCause::GuestShutdown),
            GuestExit::Reset => {
                self.lock().guest_reset = true;
                let _ = self.wake.write(1);
            }
            GuestExit::InternalError(msg) => {
                tracing::error!("{msg}");
                let mut s = self.lock();
                if s.internal_error.is_none() {
                    s.internal_error = Some(msg);
                }
                if s.want == Want::Run {
                    s.want = Want::Pause;
                }
                drop(s);
                let _ = self.wake.write(1);
            }
        }
    }

    /// Asks the VM to end (the first cause wins).
    pub fn request_shutdown(&self, cause: ShutdownCause) {
        let mut s = self.lock();
        if s.exit.is_none() {
            tracing::info!(reason = cause.reason(), "shutdown requested");
            s.exit = Some(cause);
        }
        drop(s);
        let _ = self.wake.write(1);
    }

    fn exit_cause(&self) -> Option<ShutdownCause> {
        self.lock().exit.clone()
    }

    fn take_internal_error(&self) -> Option<String> {
        self.lock().internal_error.take()
    }

    fn take_guest_reset(&self) -> bool {
        std::mem::take(&mut self.lock().guest_reset)
    }
}

/// Everything the VM is made of.
pub struct VmConfig {
    /// RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// What to boot.
    pub boot: BootSpec,
    /// The disks, in device order.
    pub disks: Vec<DiskConfig>,
    /// Where the console goes.
    pub serial_out: Output,
    /// Feed stdin to the console.
    pub serial_stdin: bool,
    /// Exit when the guest resets instead of rebooting it (QEMU's `-no-reboot`).
    pub no_reboot: bool,
    /// Start with the vCPUs stopped (QEMU's `-S`): the VM is `paused` until `cont`.
    pub start_paused: bool,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("memory", &self.memory)
            .field("vcpus", &self.vcpus)
            .field("boot", &self.boot)
            .field("disks", &self.disks)
            .finish_non_exhaustive()
    }
}

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Invalid configuration.
    #[error("{0}")]
    Config(String),
    /// `/dev/kvm` could not be used.
    #[error("KVM: {0}")]
    Kvm(String),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Loading the kernel.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// A disk.
    #[error(transparent)]
    Disk(#[from] crate::devices::block::DiskError),
    /// The ACPI tables.
    #[error("ACPI tables: {0}")]
    Acpi(String),
    /// Threads, eventfds, the event loop.
    #[error("{0}")]
    Os(String),
}

fn kvm_err(what: &str) -> impl Fn(kvm_ioctls::Error) -> VmError + '_ {
    move |e| VmError::Kvm(format!("{what}: {e}"))
}

/// The part of the VM the monitor acts on.
pub struct VmCore {
    ctl: Arc<Control>,
    mem: Arc<GuestMemory>,
    boot: BootSpec,
    num_vcpus: u8,
    no_reboot: bool,
    vcpus: Mutex<Vec<VcpuThread>>,
    disks: Vec<Disk>,
    ged: Arc<Ged>,
    state: Mutex<RunState>,
    /// Held through every run-state transition (stop, cont, reset, internal error),
    /// which come from the monitor, the error policy's stop thread and the event
    /// loop: each checks the state and then acts on it, and must not interleave.
    lifecycle: Mutex<()>,
    events: EventSlot,
}

/// Where QMP events go once a monitor exists (shared by the VM and its disks).
pub type EventSlot = Arc<OnceLock<EventSender>>;

impl std::fmt::Debug for VmCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmCore")
            .field("state", &self.status())
            .finish_non_exhaustive()
    }
}

impl VmCore {
    /// Sends `STOP`, `RESUME`, `SHUTDOWN`, ... to the monitors from now on.
    pub fn attach_events(&self, events: EventSender) {
        let _ = self.events.set(events);
    }

    /// Emits a QMP event (dropped without a monitor).
    pub fn emit(&self, name: &str, data: Option<serde_json::Value>) {
        if let Some(e) = self.events.get() {
            e.emit(name, data);
        }
    }

    /// The run state.
    pub fn status(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_status(&self, s: RunState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// The disks.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    /// The control block (for signal handlers and the quit hook).
    pub fn control(&self) -> &Arc<Control> {
        &self.ctl
    }

    /// Parks every vCPU thread (kicking them out of `KVM_RUN` until they are). A
    /// thread that has ended (one whose vCPU could not be set up) never parks and is
    /// not waited for.
    fn park_vcpus(&self, want: Want) {
        let vcpus = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        let n = vcpus.len();
        let ended = || vcpus.iter().filter(|v| v.finished()).count();
        let mut s = self.ctl.lock();
        // Exit is final: a later pause request does not undo it.
        if s.want != Want::Exit {
            s.want = want;
        }
        self.ctl.cv.notify_all();
        while s.want == Want::Pause && s.parked + ended() < n {
            drop(s);
            for v in vcpus.iter() {
                v.kick();
            }
            s = self.ctl.lock();
            let (g, _) = self
                .ctl
                .cv
                .wait_timeout(s, Duration::from_millis(2))
                .unwrap_or_else(|e| e.into_inner());
            s = g;
        }
    }

    /// Stops the devices (waiting for requests in flight) and flushes every disk.
    fn quiesce_devices(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for d in &self.disks {
            d.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pause();
            if let Err(e) = d.config.node.flush() {
                errors.push(format!("{}: flush failed: {}", d.config.id, e.desc));
            }
        }
        errors
    }

    /// QMP `stop`: pauses the vCPUs, drains and flushes disk I/O, emits `STOP`.
    /// Stopping a VM that is not running does nothing.
    pub fn stop(&self) {
        self.stop_as(RunState::Paused);
    }

    fn stop_as(&self, state: RunState) {
        let _t = lock_transition(&self.lifecycle);
        if self.status() != RunState::Running {
            return;
        }
        self.park_vcpus(Want::Pause);
        for e in self.quiesce_devices() {
            tracing::warn!("{e}");
        }
        self.set_status(state);
        self.emit("STOP", None);
    }

    /// QMP `cont`: resumes a paused VM and emits `RESUME`.
    pub fn cont(&self) -> Result<(), String> {
        let _t = lock_transition(&self.lifecycle);
        match self.status() {
            RunState::Running => return Ok(()),
            RunState::Prelaunch | RunState::Paused | RunState::IoError => {}
            RunState::Shutdown | RunState::InternalError => {
                return Err("Resetting the Virtual Machine is required".into())
            }
        }
        for d in &self.disks {
            d.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .resume();
        }
        {
            let mut s = self.ctl.lock();
            if s.want == Want::Pause {
                s.want = Want::Run;
            }
            self.ctl.cv.notify_all();
        }
        self.set_status(RunState::Running);
        self.emit("RESUME", None);
        Ok(())
    }

    /// QMP `system_powerdown`: presses the ACPI power button (the GED's power-down
    /// event and interrupt; the guest's `_EVT` notifies `PWRB`) and emits `POWERDOWN`.
    /// What happens next is up to the guest, as in QEMU.
    pub fn powerdown(&self) {
        self.ged.power_button();
        self.emit("POWERDOWN", None);
    }

    /// Resets the machine: every vCPU parks, the devices are reset, the ACPI tables
    /// and the kernel are loaded again and the vCPUs restart from their power-on
    /// state. A paused VM stays paused. Emits `RESET`.
    fn reset(&self, guest: bool) -> Result<(), String> {
        let _t = lock_transition(&self.lifecycle);
        let before = self.status();
        if matches!(before, RunState::Shutdown) {
            return Err("the VM is shutting down".into());
        }
        self.park_vcpus(Want::Pause);
        self.ged.reset();
        for d in &self.disks {
            let mut t = d.transport.lock().unwrap_or_else(|e| e.into_inner());
            t.reset();
            if let Err(e) = d.config.node.flush() {
                tracing::warn!(disk = %d.config.id, error = %e.desc, "flush at reset failed");
            }
        }
        let loaded = setup_acpi(&self.mem, self.num_vcpus, self.disks.len())
            .map_err(|e| e.to_string())
            .and_then(|rsdp| boot::load(&self.mem, &self.boot, rsdp).map_err(|e| e.to_string()));
        let entry = match loaded {
            Ok(entry) => entry,
            Err(e) => {
                // The vCPUs stay parked: say so rather than report a running VM.
                tracing::error!(error = %e, "reloading the machine at reset failed");
                if before == RunState::Running {
                    self.emit("STOP", None);
                }
                self.set_status(RunState::InternalError);
                return Err(e);
            }
        };
        {
            let mut s = self.ctl.lock();
            s.reset_epoch += 1;
            s.reset_entry = Some(entry);
            if before == RunState::Running && s.want == Want::Pause {
                s.want = Want::Run;
            }
            self.ctl.cv.notify_all();
        }
        if before == RunState::InternalError {
            // As QEMU: a reset clears the error, and the machine waits for `cont`.
            self.set_status(RunState::Prelaunch);
        }
        let reason = if guest {
            "guest-reset"
        } else {
            "host-qmp-system-reset"
        };
        self.emit(
            "RESET",
            Some(serde_json::json!({"guest": guest, "reason": reason})),
        );
        Ok(())
    }

    /// QMP `system_reset`.
    pub fn system_reset(&self) -> Result<(), String> {
        self.reset(false)
    }

    /// A device's error policy stopped on a failed request: pause the VM as QEMU does
    /// (`werror=stop`), from outside the device lock.
    fn device_stopped(self: &Arc<Self>) {
        let core = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vm-stop".into())
            .spawn(move || core.stop_as(RunState::IoError));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot stop the VM after a device error");
        }
    }
}

/// A created VM.
pub struct Vm {
    core: Arc<VmCore>,
    bus: Arc<Bus>,
    pending_vcpus: Vec<(u8, kvm_ioctls::VcpuFd)>,
    serial_stdin: bool,
    // Field order matters for drop: the VM file descriptor goes before the memory it maps.
    _vm: VmFd,
    _kvm: Kvm,
    mem: Arc<GuestMemory>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

/// The ACPI description of the machine, written into guest memory.
fn setup_acpi(
    mem: &GuestMemory,
    vcpus: u8,
    disks: usize,
) -> Result<Option<vm_memory::GuestAddress>, VmError> {
    let cfg = crate::acpi::AcpiConfig {
        num_cpus: vcpus,
        virtio_mmio: (0..disks)
            .map(|i| crate::acpi::MmioDevice {
                addr: virtio_mmio_addr(i),
                size: VIRTIO_MMIO_SIZE,
                gsi: virtio_mmio_gsi(i),
            })
            .collect(),
        ged: Some(crate::acpi::GedDevice {
            addr: GED_MMIO_ADDR,
            gsi: GED_GSI,
        }),
    };
    crate::acpi::setup_tables(mem, &cfg)
        .map(Some)
        .map_err(|e| VmError::Acpi(e.to_string()))
}

impl Vm {
    /// Builds the VM and loads the kernel; no guest code runs yet.
    pub fn create(cfg: VmConfig) -> Result<Vm, VmError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(VmError::Config(format!(
                "the number of vCPUs must be between 1 and {MAX_VCPUS}"
            )));
        }
        if cfg.disks.len() > VIRTIO_MMIO_MAX {
            return Err(VmError::Config(format!(
                "at most {VIRTIO_MMIO_MAX} disks are supported"
            )));
        }
        let kvm = Kvm::new().map_err(kvm_err("cannot open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm_err("set TSS address"))?;
        vm.set_identity_map_address(0xfffb_c000)
            .map_err(kvm_err("set identity map address"))?;
        vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("create PIT"))?;
        let mem = Arc::new(memory::create(cfg.memory)?);
        memory::register(&vm, &mem)?;

        let ctl = Arc::new(Control::new(cfg.start_paused).map_err(|e| VmError::Os(e.to_string()))?);
        let events: EventSlot = Arc::new(OnceLock::new());
        let mut disks = Vec::new();
        for (i, d) in cfg.disks.into_iter().enumerate() {
            disks.push(Disk::new(&vm, mem.clone(), i, d, events.clone())?);
        }
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Os(e.to_string()))?;
        vm.register_irqfd(&serial_irq, COM1_GSI)
            .map_err(kvm_err("serial irqfd"))?;
        let serial = SerialDevice::new(serial_irq, cfg.serial_out);
        let ged_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Os(e.to_string()))?;
        vm.register_irqfd(&ged_irq, GED_GSI)
            .map_err(kvm_err("GED irqfd"))?;
        let ged = Arc::new(Ged::new(Arc::new(ged_irq)));

        let rsdp = setup_acpi(&mem, cfg.vcpus, disks.len())?;
        let entry = boot::load(&mem, &cfg.boot, rsdp)?;
        tracing::debug!(?entry, "kernel loaded");

        let mut pending = Vec::new();
        for id in 0..cfg.vcpus {
            let fd = vcpu::create(&kvm, &vm, id, cfg.vcpus).map_err(kvm_err("create vCPU"))?;
            if id == 0 {
                boot::regs::setup_boot_vcpu(&fd, &*mem, entry.mode, entry.entry, entry.info)?;
            }
            pending.push((id, fd));
        }
        let bus = Arc::new(Bus {
            serial,
            mmio: disks
                .iter()
                .map(|d| MmioSlot::new(d.transport.clone()))
                .collect(),
            memory: mem.clone(),
            ged: ged.clone(),
        });
        let core = Arc::new(VmCore {
            ctl,
            mem: mem.clone(),
            boot: cfg.boot,
            num_vcpus: cfg.vcpus,
            no_reboot: cfg.no_reboot,
            vcpus: Mutex::new(Vec::new()),
            disks,
            ged,
            state: Mutex::new(if cfg.start_paused {
                RunState::Prelaunch
            } else {
                RunState::Running
            }),
            lifecycle: Mutex::new(()),
            events,
        });
        for d in &core.disks {
            let weak = Arc::downgrade(&core);
            d.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_stop_hook(Arc::new(move || {
                    if let Some(c) = weak.upgrade() {
                        c.device_stopped();
                    }
                }));
        }
        Ok(Vm {
            core,
            bus,
            pending_vcpus: pending,
            serial_stdin: cfg.serial_stdin,
            _vm: vm,
            _kvm: kvm,
            mem,
        })
    }

    /// The shared part the monitor uses.
    pub fn core(&self) -> &Arc<VmCore> {
        &self.core
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), VmError> {
        let mut threads = self.core.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        for (id, fd) in self.pending_vcpus.drain(..) {
            let t = VcpuThread::spawn(id, fd, self.bus.clone(), self.core.ctl.clone())
                .map_err(|e| VmError::Os(format!("cannot start a vCPU thread: {e}")))?;
            threads.push(t);
        }
        Ok(())
    }

    /// Runs the event loop until the VM must end; returns why.
    pub fn run(&mut self) -> Result<ShutdownCause, VmError> {
        let os = |e: event_manager::Error| VmError::Os(format!("event loop: {e}"));
        let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().map_err(os)?;
        for d in &self.core.disks {
            let h = d.queue_handler().map_err(|e| VmError::Os(e.to_string()))?;
            em.add_subscriber(Box::new(h));
        }
        if self.serial_stdin {
            em.add_subscriber(Box::new(StdinInput::new(self.bus.serial.clone())));
        }
        let wake = self
            .core
            .ctl
            .wake
            .try_clone()
            .map_err(|e| VmError::Os(e.to_string()))?;
        em.add_subscriber(Box::new(Wake(wake)));
        loop {
            if let Some(cause) = self.core.ctl.exit_cause() {
                return Ok(cause);
            }
            if self.core.ctl.take_guest_reset() {
                if self.core.no_reboot {
                    return Ok(ShutdownCause::GuestReset);
                }
                if let Err(e) = self.core.reset(true) {
                    return Ok(ShutdownCause::InternalError(format!("reset failed: {e}")));
                }
            }
            if let Some(msg) = self.core.ctl.take_internal_error() {
                if self.core.events.get().is_none() {
                    return Ok(ShutdownCause::InternalError(msg));
                }
                // As QEMU: the VM stops in internal-error state; the monitor decides.
                let _t = lock_transition(&self.core.lifecycle);
                self.core.park_vcpus(Want::Pause);
                for e in self.core.quiesce_devices() {
                    tracing::warn!("{e}");
                }
                self.core.set_status(RunState::InternalError);
                self.core.emit("STOP", None);
            }
            match em.run_with_timeout(500) {
                Ok(_) => {}
                Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(os(e)),
            }
        }
    }

    /// Ends the vCPU threads, stops the devices and flushes the disks; emits
    /// `SHUTDOWN` for `cause`. Returns flush errors.
    pub fn shutdown(&mut self, cause: &ShutdownCause) -> Vec<String> {
        self.core.park_vcpus(Want::Exit);
        {
            let mut v = self.core.vcpus.lock().unwrap_or_else(|e| e.into_inner());
            // Kick until every thread has left KVM_RUN (a kick can land just before
            // a thread enters it).
            while v.iter().any(|t| !t.finished()) {
                for t in v.iter() {
                    t.kick();
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            for t in v.iter_mut() {
                t.join();
            }
        }
        let errors = self.core.quiesce_devices();
        self.core.set_status(RunState::Shutdown);
        self.core.emit(
            "SHUTDOWN",
            Some(serde_json::json!({"guest": cause.guest(), "reason": cause.reason()})),
        );
        errors
    }
}

/// Drains the control eventfd so the loop wakes up to look at the control state.
struct Wake(EventFd);

impl MutEventSubscriber for Wake {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            tracing::error!(error = ?e, "cannot watch the control eventfd");
        }
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
}

/// Takes the run-state transition lock (a poisoned lock is still a lock).
fn lock_transition(m: &Mutex<()>) -> std::sync::MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

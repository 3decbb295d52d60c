//! vCPUs: creation (CPUID from KVM's supported set with this vCPU's APIC id, LAPIC
//! LINT pins), one thread each running `KVM_RUN`, and the dispatch of its exits to the
//! device [`Bus`]. A thread parks when the VM is paused; it is kicked out of
//! `KVM_RUN` by a signal.

use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::power::PowerEvent;
use crate::devices::Bus;
use crate::vm::{Control, GuestExit};

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
            tracing::error!(error = %e, "cannot install the vCPU kick handler");
        }
    });
}

/// Creates vCPU `id` of `count` with CPUID and LAPIC set up.
pub fn create(kvm: &Kvm, vm: &VmFd, id: u8, count: u8) -> Result<VcpuFd, kvm_ioctls::Error> {
    let vcpu = vm.create_vcpu(u64::from(id))?;
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC id, logical processor count, "running on a hypervisor".
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid)?;
    crate::boot::regs::setup_lint(&vcpu)?;
    Ok(vcpu)
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VcpuThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VcpuThread")
    }
}

impl VcpuThread {
    /// Starts a thread running `vcpu`.
    pub fn spawn(
        id: u8,
        vcpu: VcpuFd,
        bus: Arc<Bus>,
        ctl: Arc<Control>,
    ) -> std::io::Result<VcpuThread> {
        install_kick_handler();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || run(id, vcpu, &bus, &ctl))?;
        Ok(VcpuThread {
            handle: Some(handle),
        })
    }

    /// Interrupts `KVM_RUN` on this thread.
    pub fn kick(&self) {
        if let Some(h) = &self.handle {
            // A thread that has already exited cannot be signalled; that is fine.
            let _ = h.kill(kick_signal());
        }
    }

    /// Whether the thread has ended.
    pub fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Waits for the thread to end.
    pub fn join(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A vCPU's power-on state, restored at reset.
struct PowerOnState {
    regs: kvm_bindings::kvm_regs,
    sregs: kvm_bindings::kvm_sregs,
    fpu: kvm_bindings::kvm_fpu,
    lapic: kvm_bindings::kvm_lapic_state,
    mp_state: kvm_bindings::kvm_mp_state,
}

impl PowerOnState {
    fn save(v: &VcpuFd) -> Result<Self, kvm_ioctls::Error> {
        Ok(PowerOnState {
            regs: v.get_regs()?,
            sregs: v.get_sregs()?,
            fpu: v.get_fpu()?,
            lapic: v.get_lapic()?,
            mp_state: v.get_mp_state()?,
        })
    }

    fn restore(&self, v: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
        v.set_sregs(&self.sregs)?;
        v.set_regs(&self.regs)?;
        v.set_fpu(&self.fpu)?;
        v.set_lapic(&self.lapic)?;
        v.set_mp_state(self.mp_state)
    }
}

/// Puts `vcpu` back in its power-on state (the boot vCPU at the new entry).
fn reset_vcpu(
    id: u8,
    vcpu: &VcpuFd,
    power_on: &PowerOnState,
    entry: Option<crate::boot::BootEntry>,
    bus: &Bus,
) -> Result<(), String> {
    power_on.restore(vcpu).map_err(|e| e.to_string())?;
    if let (0, Some(e)) = (id, entry) {
        crate::boot::regs::setup_boot_vcpu(vcpu, &*bus.memory, e.mode, e.entry, e.info)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn run(id: u8, mut vcpu: VcpuFd, bus: &Bus, ctl: &Control) {
    tracing::debug!(vcpu = id, "vCPU thread started");
    let power_on = match PowerOnState::save(&vcpu) {
        Ok(p) => p,
        Err(e) => {
            ctl.guest_exit(GuestExit::InternalError(format!("vCPU {id}: {e}")));
            return;
        }
    };
    let mut epoch = 0;
    while let Some((now, entry)) = ctl.park_if_paused() {
        if now != epoch {
            epoch = now;
            if let Err(e) = reset_vcpu(id, &vcpu, &power_on, entry, bus) {
                ctl.guest_exit(GuestExit::InternalError(format!("vCPU {id} reset: {e}")));
                continue;
            }
        }
        match vcpu.run() {
            Ok(exit) => {
                if let Some(e) = handle_exit(id, exit, bus) {
                    ctl.guest_exit(e);
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                ctl.guest_exit(GuestExit::InternalError(format!("vCPU {id}: KVM_RUN: {e}")));
            }
        }
    }
    tracing::debug!(vcpu = id, "vCPU thread ends");
}

fn handle_exit(id: u8, exit: VcpuExit<'_>, bus: &Bus) -> Option<GuestExit> {
    match exit {
        VcpuExit::IoIn(port, data) => bus.pio_read(port, data),
        VcpuExit::IoOut(port, data) => match bus.pio_write(port, data)? {
            PowerEvent::PowerOff => return Some(GuestExit::PowerOff),
            PowerEvent::Reset => return Some(GuestExit::Reset),
        },
        VcpuExit::MmioRead(addr, data) => bus.mmio_read(addr, data),
        VcpuExit::MmioWrite(addr, data) => bus.mmio_write(addr, data),
        // With the in-kernel irqchip HLT is handled by KVM; a stray one is harmless.
        VcpuExit::Hlt => {}
        VcpuExit::Shutdown => return Some(GuestExit::Reset),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => return Some(GuestExit::PowerOff),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => return Some(GuestExit::Reset),
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(GuestExit::InternalError(format!(
                "vCPU {id}: entry failed (reason {reason:#x}, cpu {cpu})"
            )))
        }
        VcpuExit::InternalError => {
            return Some(GuestExit::InternalError(format!(
                "vCPU {id}: KVM internal error (emulation failure)"
            )))
        }
        other => {
            return Some(GuestExit::InternalError(format!(
                "vCPU {id}: unexpected exit {other:?}"
            )))
        }
    }
    None
}

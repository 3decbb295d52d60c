//! COM1: the `vm-superio` 8250 UART at [`COM1_PORT`], interrupting on GSI 4 through an
//! irqfd, writing to stdout or a file and (with stdio) reading the VMM's stdin.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::layout::COM1_PORT;

/// The UART's interrupt: an eventfd registered as an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest output goes.
pub type Output = Box<dyn Write + Send>;

/// The UART.
pub type Uart = Serial<IrqTrigger, NoEvents, Output>;

/// Number of ports the UART decodes.
pub const PORTS: u16 = 8;

/// COM1, shared between the vCPUs (register access) and the event loop (input).
#[derive(Clone)]
pub struct SerialDevice(pub Arc<Mutex<Uart>>);

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialDevice")
    }
}

fn lock(u: &Mutex<Uart>) -> std::sync::MutexGuard<'_, Uart> {
    u.lock().unwrap_or_else(|e| e.into_inner())
}

impl SerialDevice {
    /// A UART writing to `out` and interrupting through `irq`.
    pub fn new(irq: EventFd, out: Output) -> Self {
        SerialDevice(Arc::new(Mutex::new(Serial::new(IrqTrigger(irq), out))))
    }

    /// Whether `port` belongs to the UART.
    pub fn decodes(port: u16) -> bool {
        (COM1_PORT..COM1_PORT + PORTS).contains(&port)
    }

    /// A guest `in` from `port`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if let Some(b) = data.first_mut() {
            *b = lock(&self.0).read((port - COM1_PORT) as u8);
        }
    }

    /// A guest `out` to `port` (only the first byte of a wider access is used).
    pub fn write(&self, port: u16, data: &[u8]) {
        if let Some(&b) = data.first() {
            let mut u = lock(&self.0);
            // A byte to the transmit register is written and flushed by the UART.
            if let Err(e) = u.write((port - COM1_PORT) as u8, b) {
                tracing::debug!(error = ?e, "serial write failed");
            }
        }
    }

    /// Queues host input for the guest; returns how many bytes fitted.
    pub fn input(&self, bytes: &[u8]) -> usize {
        let mut u = lock(&self.0);
        let room = u.fifo_capacity();
        let n = bytes.len().min(room);
        u.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
    }
}

/// Feeds the VMM's stdin to the UART from the event loop.
pub struct StdinInput {
    serial: SerialDevice,
}

impl StdinInput {
    /// Input for `serial`.
    pub fn new(serial: SerialDevice) -> Self {
        StdinInput { serial }
    }
}

impl MutEventSubscriber for StdinInput {
    fn init(&mut self, ops: &mut EventOps) {
        let stdin = io::stdin();
        // A regular file or /dev/null cannot be polled: then there is no input.
        if let Err(e) = ops.add(Events::new(&stdin, EventSet::IN)) {
            tracing::debug!(error = ?e, "stdin cannot be polled; serial input disabled");
        }
    }

    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let fd = io::stdin().as_raw_fd();
        // SAFETY: reading into a stack buffer of the given length from stdin.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            // Delivered even when the writer has hung up meanwhile (a pipe reports
            // IN and HUP together for its last bytes); the end is seen on the next
            // read, which returns 0.
            self.serial.input(&buf[..n as usize]);
        } else {
            // EOF or error: stop watching stdin.
            let _ = ops.remove(Events::new(&io::stdin(), EventSet::IN));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output_and_input_is_readable() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let s = SerialDevice::new(irq, Box::new(sink.clone()));
        for b in b"hi\n" {
            s.write(COM1_PORT, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert_eq!(s.input(b"x"), 1);
        let mut d = [0u8; 1];
        // Line status register: data ready.
        s.read(COM1_PORT + 5, &mut d);
        assert_eq!(d[0] & 1, 1);
        s.read(COM1_PORT, &mut d);
        assert_eq!(d[0], b'x');
        // A wide access reads one byte of UART and open bus above it.
        let mut w = [0u8; 2];
        s.read(COM1_PORT + 7, &mut w);
        assert_eq!(w[1], 0xff);
        assert!(!SerialDevice::decodes(COM1_PORT + 8));
    }
}

//! The ACPI Generic Event Device (`ACPI0013`): the event selector register at
//! [`crate::layout::GED_MMIO_ADDR`] and its interrupt. `system_powerdown` sets
//! [`GED_PWR_DOWN_EVT`] and raises the GSI; the guest's `_EVT` reads (and so clears)
//! the selector and notifies the power button device.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::virtio_mmio::Interrupt;
use crate::layout::{GED_EVT_SEL_LEN, GED_EVT_SEL_OFFSET, GED_PWR_DOWN_EVT};

/// The GED's state: pending event bits and the interrupt line.
pub struct Ged {
    selector: AtomicU32,
    irq: Arc<dyn Interrupt>,
}

impl std::fmt::Debug for Ged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ged")
            .field("selector", &self.selector.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Ged {
    /// A GED interrupting through `irq`.
    pub fn new(irq: Arc<dyn Interrupt>) -> Self {
        Ged {
            selector: AtomicU32::new(0),
            irq,
        }
    }

    /// Signals a power-button press (QMP `system_powerdown`).
    pub fn power_button(&self) {
        self.selector.fetch_or(GED_PWR_DOWN_EVT, Ordering::SeqCst);
        self.irq.trigger();
    }

    /// Drops pending events (machine reset).
    pub fn reset(&self) {
        self.selector.store(0, Ordering::SeqCst);
    }

    /// A guest read at `offset` into the window: a 4-byte read of the selector returns
    /// and clears it; anything else reads as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == GED_EVT_SEL_OFFSET && data.len() as u64 == GED_EVT_SEL_LEN {
            let v = self.selector.swap(0, Ordering::SeqCst);
            data.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// A guest write: the window has no writable register; ignored.
    pub fn write(&self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "write to the GED ignored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Interrupt for Count {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn rd(g: &Ged, off: u64, len: usize) -> Vec<u8> {
        let mut d = vec![0xaa; len];
        g.read(off, &mut d);
        d
    }

    #[test]
    fn power_button_sets_the_bit_raises_the_irq_and_a_read_clears_it() {
        let irq = Arc::new(Count::default());
        let g = Ged::new(irq.clone());
        assert_eq!(rd(&g, 0, 4), [0, 0, 0, 0]);
        g.power_button();
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        // Wrong sizes and offsets neither see nor clear the event.
        assert_eq!(rd(&g, 0, 1), [0]);
        assert_eq!(rd(&g, 0, 8), [0; 8]);
        assert_eq!(rd(&g, 4, 4), [0; 4]);
        g.write(0, &[0, 0, 0, 0]);
        assert_eq!(rd(&g, 0, 4), GED_PWR_DOWN_EVT.to_le_bytes());
        assert_eq!(rd(&g, 0, 4), [0, 0, 0, 0]);
        g.power_button();
        g.reset();
        assert_eq!(rd(&g, 0, 4), [0, 0, 0, 0]);
    }
}

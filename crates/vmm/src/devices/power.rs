//! The ACPI hardware-reduced sleep control/status and reset registers (ports from
//! [`crate::layout`]): writing `SLP_EN | SLP_TYP=5` powers off, writing the reset
//! value resets.

use crate::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT, ACPI_SLP_EN,
};

/// What a write to the power registers asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// Soft off (S5).
    PowerOff,
    /// Reset.
    Reset,
}

/// Whether `port` is one of the power registers.
pub fn decodes(port: u16) -> bool {
    matches!(
        port,
        ACPI_SLEEP_CONTROL_PORT | ACPI_SLEEP_STATUS_PORT | ACPI_RESET_PORT
    )
}

/// A guest read: the registers read as zero (no wake status).
pub fn read(_port: u16, data: &mut [u8]) {
    data.fill(0);
}

/// A guest write; only single-byte writes count.
pub fn write(port: u16, data: &[u8]) -> Option<PowerEvent> {
    let [v] = data else {
        tracing::debug!(
            port,
            len = data.len(),
            "power register write of the wrong size"
        );
        return None;
    };
    match port {
        ACPI_SLEEP_CONTROL_PORT => {
            let typ = (v >> 2) & 0x7;
            if v & ACPI_SLP_EN != 0 && typ == ACPI_S5_SLEEP_TYPE {
                Some(PowerEvent::PowerOff)
            } else {
                tracing::debug!(value = v, "sleep request ignored (only S5 is supported)");
                None
            }
        }
        ACPI_RESET_PORT if *v == ACPI_RESET_VALUE => Some(PowerEvent::Reset),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_s5_with_slp_en_and_the_reset_value_act() {
        let off = ACPI_SLP_EN | (ACPI_S5_SLEEP_TYPE << 2);
        assert_eq!(
            write(ACPI_SLEEP_CONTROL_PORT, &[off]),
            Some(PowerEvent::PowerOff)
        );
        assert_eq!(
            write(ACPI_SLEEP_CONTROL_PORT, &[ACPI_S5_SLEEP_TYPE << 2]),
            None
        );
        assert_eq!(
            write(ACPI_SLEEP_CONTROL_PORT, &[ACPI_SLP_EN | (3 << 2)]),
            None
        );
        assert_eq!(write(ACPI_SLEEP_CONTROL_PORT, &[off, 0]), None);
        assert_eq!(
            write(ACPI_RESET_PORT, &[ACPI_RESET_VALUE]),
            Some(PowerEvent::Reset)
        );
        assert_eq!(write(ACPI_RESET_PORT, &[2]), None);
        assert_eq!(write(ACPI_SLEEP_STATUS_PORT, &[0xff]), None);
        let mut d = [0xaa; 2];
        read(ACPI_SLEEP_STATUS_PORT, &mut d);
        assert_eq!(d, [0, 0]);
    }
}

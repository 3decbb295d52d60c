//! In-memory storage, for tests and fuzzing: bounded in size so that hostile input
//! cannot make it allocate without limit.

use std::sync::RwLock;

use super::Storage;
use crate::{Error, Result};

/// A storage node held in memory, with a hard size limit.
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
    limit: u64,
    read_only: bool,
}

impl MemStorage {
    /// Creates storage holding `data`, which may grow to at most `limit` bytes.
    pub fn new(data: Vec<u8>, limit: u64) -> Self {
        MemStorage {
            data: RwLock::new(data),
            limit,
            read_only: false,
        }
    }

    /// Creates read-only storage over `data`.
    pub fn read_only(data: Vec<u8>) -> Self {
        let limit = data.len() as u64;
        MemStorage {
            data: RwLock::new(data),
            limit,
            read_only: true,
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn grow_to(&self, data: &mut Vec<u8>, end: u64) -> Result<()> {
        if end > self.limit {
            return Err(Error::NoSpace(format!(
                "in-memory storage limit of {} bytes exceeded",
                self.limit
            )));
        }
        if end as usize > data.len() {
            data.resize(end as usize, 0);
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let len = data.len() as u64;
        buf.fill(0);
        if offset < len {
            let n = ((len - offset) as usize).min(buf.len());
            buf[..n].copy_from_slice(&data[offset as usize..offset as usize + n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::invalid("write beyond the addressable range"))?;
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        self.grow_to(&mut data, end)?;
        data[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn size(&self) -> Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_size(&self, size: u64) -> Result<()> {
        self.check_writable()?;
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        if size > self.limit {
            return Err(Error::NoSpace("in-memory storage limit exceeded".into()));
        }
        data.resize(size as usize, 0);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        self.check_writable()?;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::invalid("range beyond the addressable range"))?;
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        self.grow_to(&mut data, end)?;
        data[offset as usize..end as usize].fill(0);
        Ok(())
    }

    fn preallocate(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::invalid("range beyond the addressable range"))?;
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        self.grow_to(&mut data, end)
    }

    fn allocated_size(&self) -> Result<u64> {
        self.size()
    }

    fn name(&self) -> String {
        "memory".to_string()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}

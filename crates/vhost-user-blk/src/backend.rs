//! The `VhostUserBackend` implementation: features, config space and the queue
//! workers, delegating requests to `strata-virtio-blk`.

use std::io;
use std::sync::{Arc, RwLock};

use strata_virtio_blk::{BlockBackend, VirtioBlk};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::MAX_QUEUE_SIZE;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// One connection's vhost-user backend: the shared device, the current guest memory
/// and one exit event per worker thread.
pub struct BlkBackend<B: BlockBackend> {
    dev: Arc<VirtioBlk<B>>,
    mem: Arc<RwLock<Option<Mem>>>,
    exits: Arc<Vec<(std::sync::Mutex<Option<EventConsumer>>, EventNotifier)>>,
}

impl<B: BlockBackend> Clone for BlkBackend<B> {
    fn clone(&self) -> Self {
        BlkBackend {
            dev: self.dev.clone(),
            mem: self.mem.clone(),
            exits: self.exits.clone(),
        }
    }
}

impl<B: BlockBackend> BlkBackend<B> {
    /// A backend for `dev`, with one worker per queue.
    pub fn new(dev: Arc<VirtioBlk<B>>) -> io::Result<Self> {
        let n = usize::from(dev.options().num_queues);
        let mut exits = Vec::with_capacity(n);
        for _ in 0..n {
            let (c, nt) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
            exits.push((std::sync::Mutex::new(Some(c)), nt));
        }
        Ok(BlkBackend {
            dev,
            mem: Arc::new(RwLock::new(None)),
            exits: Arc::new(exits),
        })
    }
}

impl<B: BlockBackend + 'static> VhostUserBackend for BlkBackend<B> {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        usize::from(self.dev.options().num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.dev.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.dev.ack_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.dev.reset();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings carry the flag; nothing device-specific depends on it.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.dev.config().read(u64::from(offset), size as usize)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.dev.write_config(u64::from(offset), buf);
        Ok(())
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exits.get(thread_index)?;
        let consumer = c.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        Some((consumer, n.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        let Some(mem) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let guard = mem.memory();
        let mut state = vring.get_mut();
        match self.dev.process_queue(state.get_queue_mut(), &*guard) {
            Ok(run) => {
                if run.stopped.is_some() {
                    tracing::warn!(queue = thread_id, "request stopped by the error policy");
                }
                if run.ring_invalid || run.bad_heads > 0 {
                    tracing::warn!(
                        queue = thread_id,
                        bad_heads = run.bad_heads,
                        ring_invalid = run.ring_invalid,
                        "the frontend's available ring holds invalid entries"
                    );
                }
                if run.notify {
                    if let Err(e) = state.signal_used_queue() {
                        tracing::warn!(queue = thread_id, error = %e, "cannot signal the frontend");
                    }
                }
            }
            // A broken ring (addresses outside guest memory): report, keep the worker.
            Err(e) => tracing::warn!(queue = thread_id, error = %e, "virtqueue unusable"),
        }
        Ok(())
    }
}

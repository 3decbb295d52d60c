//! The `VhostUserBackend` implementation: features, config space and the queue
//! events, delegating requests to the connection's [`Engine`].

use std::io;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use strata_virtio_blk::{BlockBackend, VirtioBlk};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::engine::{Engine, Mem};
use crate::MAX_QUEUE_SIZE;

/// The worker pool's threads; dropping the last handle closes and joins them.
struct Pool<B: BlockBackend + 'static> {
    engine: Arc<Engine<B>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl<B: BlockBackend + 'static> Drop for Pool<B> {
    fn drop(&mut self) {
        self.engine.close();
        for t in std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner())) {
            let _ = t.join();
        }
    }
}

/// One connection's vhost-user backend: the request engine (device, guest memory,
/// worker pool) and one exit event per vring thread.
pub struct BlkBackend<B: BlockBackend + 'static> {
    engine: Arc<Engine<B>>,
    dev: Arc<VirtioBlk<B>>,
    pool: Arc<Pool<B>>,
    exits: Arc<Vec<(Mutex<Option<EventConsumer>>, EventNotifier)>>,
}

impl<B: BlockBackend + 'static> Clone for BlkBackend<B> {
    fn clone(&self) -> Self {
        BlkBackend {
            engine: self.engine.clone(),
            dev: self.dev.clone(),
            pool: self.pool.clone(),
            exits: self.exits.clone(),
        }
    }
}

impl<B: BlockBackend + 'static> BlkBackend<B> {
    /// A backend for `dev`: one vring thread per queue plus a pool of workers
    /// (named after `name`) that run requests concurrently.
    pub fn new(dev: Arc<VirtioBlk<B>>, name: &str) -> io::Result<Self> {
        let n = usize::from(dev.options().num_queues);
        let mut exits = Vec::with_capacity(n);
        for _ in 0..n {
            let (c, nt) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
            exits.push((Mutex::new(Some(c)), nt));
        }
        let engine = Engine::new(dev.clone());
        let threads = engine.start_pool(name)?;
        Ok(BlkBackend {
            pool: Arc::new(Pool {
                engine: engine.clone(),
                threads: Mutex::new(threads),
            }),
            engine,
            dev,
            exits: Arc::new(exits),
        })
    }

    /// Resumes a device stopped by the error policy; returns the requests retried.
    pub fn resume(&self) -> usize {
        self.engine.resume()
    }

    /// Whether the error policy stopped the device.
    pub fn stopped(&self) -> bool {
        self.engine.stopped()
    }

    /// Requests held by a stop.
    pub fn pending(&self) -> usize {
        self.engine.pending()
    }

    /// Waits until the worker pool has finished every request handed to it.
    pub fn drain(&self) {
        self.engine.drain();
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
        self.engine.set_memory(mem);
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.engine.stop_queue(queue_index as usize);
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
        // One queue per vring thread: the thread index is the queue index.
        self.engine.pump(thread_id, vring);
        Ok(())
    }
}

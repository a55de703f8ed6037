//! ClientId → session handle: who is connected here, so pushes and disconnects find their socket.
//! Sharded so that thousands of connects and pushes a second do not queue on one lock.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::identity::{ClientId, ConnectionId};
use crate::session::{Command, SessionHandle};

const SHARDS: usize = 16;
/// A shard's table is never shrunk below this many entries.
const MIN_SHARD_CAPACITY: usize = 64;

/// What [`Registry::insert`] did with a session.
pub enum Insertion {
    /// The ClientId had no session here; now it has this one.
    First,
    /// The session replaced this older one of the same ClientId, which has been told to
    /// close as replaced.
    Replaced(Arc<SessionHandle>),
    /// Not inserted: this session of the same ClientId is of a connection that began its
    /// handshake later, and keeps the ClientId; the one offered is to be closed.
    Superseded(Arc<SessionHandle>),
}

/// The connected clients of this gateway.
pub struct Registry {
    shards: [Mutex<HashMap<ClientId, Arc<SessionHandle>>>; SHARDS],
    /// Picks a ClientId's shard; keyed at random per gateway, so that clients cannot choose
    /// ClientIds that all wait on one lock.
    shard_keys: RandomState,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            shard_keys: RandomState::new(),
        }
    }
}

impl Registry {
    fn shard_index(&self, client_id: &ClientId) -> usize {
        (self.shard_keys.hash_one(client_id) as usize) % SHARDS
    }

    fn shard(&self, client_id: &ClientId) -> MutexGuard<'_, HashMap<ClientId, Arc<SessionHandle>>> {
        self.shards[self.shard_index(client_id)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `handle` the session of its ClientId, unless the session there now is of a
    /// connection whose handshake began later (a newer [`ConnectionId`]): the newer connection
    /// keeps the ClientId, whichever of the two the API approved last. A session it replaces
    /// gets [`Command::Replaced`] under the ClientId's lock, so that a control DELETE finds
    /// either the older connection still open or the newer one, never the older one unmapped
    /// but not yet told (its DELETE would close the older one and leave the newer open).
    pub fn insert(&self, handle: Arc<SessionHandle>) -> Insertion {
        use std::collections::hash_map::Entry;
        let mut shard = self.shard(&handle.client_id);
        match shard.entry(handle.client_id.clone()) {
            Entry::Vacant(place) => {
                place.insert(handle);
                Insertion::First
            }
            Entry::Occupied(place) if place.get().connection_id > handle.connection_id => {
                Insertion::Superseded(Arc::clone(place.get()))
            }
            Entry::Occupied(mut place) => {
                let older = place.insert(handle);
                older.command(Command::Replaced);
                Insertion::Replaced(older)
            }
        }
    }

    /// The current session of `client_id`.
    pub fn get(&self, client_id: &ClientId) -> Option<Arc<SessionHandle>> {
        self.shard(client_id).get(client_id).cloned()
    }

    /// Removes `client_id` only while it still maps to `connection_id`, so an older
    /// connection's close never unmaps a newer one.
    pub fn remove(&self, client_id: &ClientId, connection_id: ConnectionId) -> bool {
        let mut shard = self.shard(client_id);
        match shard.get(client_id) {
            Some(current) if current.connection_id == connection_id => {
                shard.remove(client_id);
                // Give back the table a crowd of departed clients left behind; the slack
                // keeps steady churn from resizing it back and forth. An empty shard gives
                // back all of it, so a gateway whose clients all left holds no table.
                if shard.is_empty() {
                    *shard = HashMap::new();
                } else if shard.capacity() > MIN_SHARD_CAPACITY
                    && shard.len() * 4 < shard.capacity()
                {
                    let keep = (shard.len() * 2).max(MIN_SHARD_CAPACITY);
                    shard.shrink_to(keep);
                }
                true
            }
            _ => false,
        }
    }

    /// Every current session (for shutdown).
    pub fn all(&self) -> Vec<Arc<SessionHandle>> {
        let mut all = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            all.extend(shard.values().cloned());
        }
        all
    }

    /// How many ClientIds are mapped.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Whether no ClientId is mapped.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(name: &str) -> Arc<SessionHandle> {
        Arc::new(SessionHandle::new(
            ConnectionId::next(),
            ClientId::from_path(&format!("/{name}")).unwrap(),
            ([127, 0, 0, 1], 9).into(),
        ))
    }

    #[test]
    fn a_newer_connection_replaces_the_older_one() {
        let registry = Registry::default();
        let old = handle("a");
        let new = handle("a");
        assert!(matches!(registry.insert(old.clone()), Insertion::First));
        let Insertion::Replaced(replaced) = registry.insert(new.clone()) else {
            panic!("the older one is replaced");
        };
        assert_eq!(replaced.connection_id, old.connection_id);
        assert_eq!(
            registry.get(&new.client_id).unwrap().connection_id,
            new.connection_id
        );
        // Told to close as it was unmapped: a later command is not taken.
        assert!(!old.command(Command::Shutdown), "the older one was told");
        assert!(new.command(Command::Shutdown), "the newer one was not");
    }

    #[test]
    fn an_older_connection_inserted_after_a_newer_one_does_not_replace_it() {
        let registry = Registry::default();
        let old = handle("a");
        let new = handle("a");
        assert!(matches!(registry.insert(new.clone()), Insertion::First));
        let Insertion::Superseded(keeping) = registry.insert(old.clone()) else {
            panic!("the older one is not inserted");
        };
        assert_eq!(keeping.connection_id, new.connection_id);
        assert_eq!(
            registry.get(&new.client_id).unwrap().connection_id,
            new.connection_id
        );
        assert!(!registry.remove(&old.client_id, old.connection_id));
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn the_older_connection_closing_leaves_the_newer_one_mapped() {
        let registry = Registry::default();
        let old = handle("a");
        let new = handle("a");
        registry.insert(old.clone());
        registry.insert(new.clone());
        assert!(!registry.remove(&old.client_id, old.connection_id));
        assert!(registry.get(&new.client_id).is_some());
        assert!(registry.remove(&new.client_id, new.connection_id));
        assert!(registry.is_empty());
    }

    #[test]
    fn all_lists_every_shard() {
        let registry = Registry::default();
        for i in 0..100 {
            registry.insert(handle(&format!("c{i}")));
        }
        assert_eq!(registry.all().len(), 100);
        assert_eq!(registry.len(), 100);
    }

    fn capacity(registry: &Registry) -> usize {
        registry
            .shards
            .iter()
            .map(|s| s.lock().unwrap().capacity())
            .sum()
    }

    #[test]
    fn tables_shrink_after_a_crowd_leaves_and_go_when_empty() {
        let registry = Registry::default();
        let handles: Vec<_> = (0..20_000).map(|i| handle(&format!("c{i}"))).collect();
        for h in &handles {
            registry.insert(Arc::clone(h));
        }
        let crowded = capacity(&registry);
        assert!(crowded >= 20_000);
        for h in &handles[10..] {
            assert!(registry.remove(&h.client_id, h.connection_id));
        }
        let after = capacity(&registry);
        assert!(
            after <= SHARDS * MIN_SHARD_CAPACITY * 2,
            "capacity {after} after 10 of {crowded} remain"
        );
        for h in &handles[..10] {
            assert!(registry.get(&h.client_id).is_some());
        }
        for h in &handles[..10] {
            assert!(registry.remove(&h.client_id, h.connection_id));
        }
        assert_eq!(capacity(&registry), 0, "empty tables are given back");
    }

    #[test]
    fn client_ids_that_share_a_shard_in_one_gateway_spread_in_another() {
        // Ids chosen to crowd one lock of one gateway: with keys of its own, another gateway
        // (or the same after a restart) spreads them, so no fixed list crowds every gateway.
        let one = Registry::default();
        let crowded: Vec<ClientId> = (0..100_000)
            .map(|i| ClientId::from_path(&format!("/c{i}")).unwrap())
            .filter(|id| one.shard_index(id) == 0)
            .take(64)
            .collect();
        assert_eq!(crowded.len(), 64);
        let other = Registry::default();
        let shards: std::collections::HashSet<usize> =
            crowded.iter().map(|id| other.shard_index(id)).collect();
        assert!(shards.len() > 1, "all 64 on shard {shards:?} again");
    }
}

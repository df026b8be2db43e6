//! The cluster's state in Redis: node records (a hash per node, refreshed by the heartbeat,
//! expiring after `cluster.ttl_ms`), the set of nodes seen, each node's set of rooms, and room →
//! owner records. Every change that must be atomic is one Lua script (claim, release,
//! heartbeat, reap), so two nodes racing on one name cannot both win. Key layout and TTLs:
//! docs/cluster.md.
//!
//! Nothing here is on the media path: a Redis outage only stops placements and lookups.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionManager;
use signaling_api::error::ApiError;
use signaling_api::protocol::ErrorCode;
use tokio::sync::RwLock;

/// Every key starts with this.
pub const PREFIX: &str = "gateway:";

/// How long a lost room's record stays (so a lookup can say it was lost, not unknown).
pub const LOST_TTL_MS: u64 = 3_600_000;

/// A Redis failure (unreachable, timed out, a script error).
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct StoreError(pub String);

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::new(ErrorCode::ClusterUnavailable, format!("the cluster cannot be reached: {}", e.0))
    }
}

/// One node as its record in Redis says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeRecord {
    pub id: String,
    /// Its HTTP API (`cluster.advertise_url`).
    pub url: String,
    /// Its media addresses (candidate IP and port range), for operators.
    pub media: String,
    /// Rooms it may hold (`limits.max_rooms`).
    pub capacity: u64,
    /// Rooms in its room set (counted by Redis at each claim: current even between heartbeats).
    pub rooms: u64,
    /// Participants, as of its last heartbeat.
    pub participants: u64,
    /// Forwarded packets per second, as of its last heartbeat.
    pub packets_per_s: f64,
    /// Mean media worker busy ratio (0..1), as of its last heartbeat.
    pub busy: f64,
    pub draining: bool,
    /// Unix time of its last heartbeat, ms.
    pub heartbeat_at_ms: u64,
}

impl NodeRecord {
    fn from_hash(id: &str, h: &HashMap<String, String>, rooms: u64) -> Self {
        let num = |k: &str| h.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        Self {
            id: id.to_owned(),
            url: h.get("url").cloned().unwrap_or_default(),
            media: h.get("media").cloned().unwrap_or_default(),
            capacity: num("capacity") as u64,
            rooms,
            participants: num("participants") as u64,
            packets_per_s: num("packets_per_s"),
            busy: num("busy"),
            draining: h.get("draining").is_some_and(|v| v == "1"),
            heartbeat_at_ms: num("heartbeat_at_ms") as u64,
        }
    }

    /// The fields a heartbeat writes.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.clone()),
            ("url", self.url.clone()),
            ("media", self.media.clone()),
            ("capacity", self.capacity.to_string()),
            ("rooms", self.rooms.to_string()),
            ("participants", self.participants.to_string()),
            ("packets_per_s", format!("{:.1}", self.packets_per_s)),
            ("busy", format!("{:.3}", self.busy)),
            ("draining", if self.draining { "1" } else { "0" }.to_owned()),
            ("heartbeat_at_ms", self.heartbeat_at_ms.to_string()),
        ]
    }
}

/// Who owns a room, per Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomOwner {
    pub room_id: String,
    pub node: String,
    pub name: Option<String>,
    /// The node died with the room in it.
    pub lost: bool,
    /// The owner's URL, if its record is alive.
    pub url: Option<String>,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Ok,
    /// A live room elsewhere has the name.
    Taken,
    /// This node has no record (Redis just came back): its next heartbeat registers it.
    Unregistered,
}

const CLAIM: &str = r#"
local p, node, id, name = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local function live_room(rid)
  local k = p..'room:'..rid
  local o = redis.call('HGET', k, 'node')
  if not o then return false end
  if redis.call('HGET', k, 'status') ~= 'live' then return false end
  return redis.call('EXISTS', p..'node:'..o) == 1
end
if redis.call('EXISTS', p..'node:'..node) == 0 then return 'unregistered' end
if name ~= '' then
  local nkey = p..'name:'..name
  local cur = redis.call('GET', nkey)
  if cur and cur ~= id and live_room(cur) then return 'taken' end
  redis.call('SET', nkey, id)
end
redis.call('HSET', p..'room:'..id, 'node', node, 'name', name, 'status', 'live')
redis.call('PERSIST', p..'room:'..id)
redis.call('SADD', p..'node:'..node..':rooms', id)
return 'ok'
"#;

const RELEASE: &str = r#"
local p, node, id = ARGV[1], ARGV[2], ARGV[3]
local key = p..'room:'..id
redis.call('SREM', p..'node:'..node..':rooms', id)
if redis.call('HGET', key, 'node') == node then
  local name = redis.call('HGET', key, 'name')
  redis.call('DEL', key)
  if name and name ~= '' and redis.call('GET', p..'name:'..name) == id then
    redis.call('DEL', p..'name:'..name)
  end
end
return 1
"#;

/// Refresh the node's record and TTL, and make Redis hold exactly the node's rooms: each local
/// room is (re)asserted (after a Redis restart, or after this node was taken for dead and came
/// back) unless a live node owns it; rooms of the node's set that are no longer local are
/// released. Returns 1 when the record existed before (0: (re)registered).
const HEARTBEAT: &str = r#"
local p, node, ttl, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local nk = p..'node:'..node
local existed = redis.call('EXISTS', nk)
local i = 5
for _ = 1, n do
  redis.call('HSET', nk, ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('PEXPIRE', nk, ttl)
redis.call('SADD', p..'nodes', node)
local rk = nk..':rooms'
local mine = {}
local function live_room(rid)
  local k = p..'room:'..rid
  local o = redis.call('HGET', k, 'node')
  if not o then return false end
  if redis.call('HGET', k, 'status') ~= 'live' then return false end
  return redis.call('EXISTS', p..'node:'..o) == 1
end
while i <= #ARGV do
  local id, name = ARGV[i], ARGV[i + 1]
  i = i + 2
  mine[id] = true
  local key = p..'room:'..id
  local owner = redis.call('HGET', key, 'node')
  if (not owner) or owner == node or redis.call('EXISTS', p..'node:'..owner) == 0 then
    redis.call('HSET', key, 'node', node, 'name', name, 'status', 'live')
    redis.call('PERSIST', key)
    redis.call('SADD', rk, id)
    if name ~= '' then
      local nkey = p..'name:'..name
      local cur = redis.call('GET', nkey)
      if (not cur) or cur == id or not live_room(cur) then redis.call('SET', nkey, id) end
    end
  end
end
for _, id in ipairs(redis.call('SMEMBERS', rk)) do
  if not mine[id] then
    redis.call('SREM', rk, id)
    local key = p..'room:'..id
    if redis.call('HGET', key, 'node') == node then
      local name = redis.call('HGET', key, 'name')
      redis.call('DEL', key)
      if name and name ~= '' and redis.call('GET', p..'name:'..name) == id then
        redis.call('DEL', p..'name:'..name)
      end
    end
  end
end
return existed
"#;

/// Remove nodes whose record expired: their rooms are marked lost (kept `LOST_TTL_MS`), their
/// names freed. Returns the lost room ids.
const REAP: &str = r#"
local p, ttl = ARGV[1], tonumber(ARGV[2])
local lost = {}
for _, node in ipairs(redis.call('SMEMBERS', p..'nodes')) do
  if redis.call('EXISTS', p..'node:'..node) == 0 then
    local rk = p..'node:'..node..':rooms'
    for _, id in ipairs(redis.call('SMEMBERS', rk)) do
      local key = p..'room:'..id
      if redis.call('HGET', key, 'node') == node then
        redis.call('HSET', key, 'status', 'lost')
        redis.call('PEXPIRE', key, ttl)
        local name = redis.call('HGET', key, 'name')
        if name and name ~= '' and redis.call('GET', p..'name:'..name) == id then
          redis.call('DEL', p..'name:'..name)
        end
        table.insert(lost, id)
      end
    end
    redis.call('DEL', rk)
    redis.call('SREM', p..'nodes', node)
  end
end
return lost
"#;

/// The Redis connection (one multiplexed connection that reconnects by itself) and the
/// scripts.
pub struct Store {
    client: redis::Client,
    conn: RwLock<Option<ConnectionManager>>,
    timeout: Duration,
    claim: redis::Script,
    release: redis::Script,
    heartbeat: redis::Script,
    reap: redis::Script,
}

impl Store {
    /// No connection is made yet (Redis may be down when a node starts).
    pub fn new(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            conn: RwLock::new(None),
            timeout,
            claim: redis::Script::new(CLAIM),
            release: redis::Script::new(RELEASE),
            heartbeat: redis::Script::new(HEARTBEAT),
            reap: redis::Script::new(REAP),
        })
    }

    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        if let Some(c) = self.conn.read().await.as_ref() {
            return Ok(c.clone());
        }
        let mut slot = self.conn.write().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let c = tokio::time::timeout(self.timeout * 2, self.client.get_connection_manager_with_config(config))
            .await
            .map_err(|_| StoreError("connect timed out".into()))??;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Atomically record `room_id` (and `name`) as `node`'s.
    pub async fn claim(&self, node: &str, room_id: &str, name: Option<&str>) -> Result<Claim, StoreError> {
        let mut c = self.conn().await?;
        let r: String =
            self.claim.arg(PREFIX).arg(node).arg(room_id).arg(name.unwrap_or("")).invoke_async(&mut c).await?;
        Ok(match r.as_str() {
            "ok" => Claim::Ok,
            "taken" => Claim::Taken,
            _ => Claim::Unregistered,
        })
    }

    pub async fn release(&self, node: &str, room_id: &str) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let _: i64 = self.release.arg(PREFIX).arg(node).arg(room_id).invoke_async(&mut c).await?;
        Ok(())
    }

    /// Refresh `record` (TTL `ttl`) and sync the node's rooms (id, name or "") to Redis.
    /// Returns false when the record had to be created (first start, or Redis lost it).
    pub async fn heartbeat(
        &self,
        record: &NodeRecord,
        ttl: Duration,
        rooms: &[(String, String)],
    ) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let fields = record.fields();
        let mut inv = self.heartbeat.prepare_invoke();
        inv.arg(PREFIX).arg(&record.id).arg(ttl.as_millis() as u64).arg(fields.len());
        for (k, v) in &fields {
            inv.arg(*k).arg(v);
        }
        for (id, name) in rooms {
            inv.arg(id).arg(name);
        }
        let existed: i64 = inv.invoke_async(&mut c).await?;
        Ok(existed == 1)
    }

    /// Remove dead nodes; returns the rooms that were lost with them.
    pub async fn reap(&self) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn().await?;
        Ok(self.reap.arg(PREFIX).arg(LOST_TTL_MS).invoke_async(&mut c).await?)
    }

    /// Every live node (its record has not expired), sorted by id.
    pub async fn members(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut c = self.conn().await?;
        let ids: Vec<String> = redis::cmd("SMEMBERS").arg(format!("{PREFIX}nodes")).query_async(&mut c).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGETALL").arg(format!("{PREFIX}node:{id}"));
            pipe.cmd("SCARD").arg(format!("{PREFIX}node:{id}:rooms"));
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut c).await?;
        let mut nodes = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let hash: HashMap<String, String> = redis::from_redis_value(replies[2 * i].clone()).unwrap_or_default();
            let rooms: u64 = redis::from_redis_value(replies[2 * i + 1].clone()).unwrap_or(0);
            if !hash.is_empty() {
                nodes.push(NodeRecord::from_hash(id, &hash, rooms));
            }
        }
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    /// The owner of a room, by id; `None` when Redis knows no such room.
    pub async fn owner(&self, room_id: &str) -> Result<Option<RoomOwner>, StoreError> {
        let mut c = self.conn().await?;
        let h: HashMap<String, String> =
            redis::cmd("HGETALL").arg(format!("{PREFIX}room:{room_id}")).query_async(&mut c).await?;
        let Some(node) = h.get("node").cloned() else { return Ok(None) };
        let url: Option<String> =
            redis::cmd("HGET").arg(format!("{PREFIX}node:{node}")).arg("url").query_async(&mut c).await?;
        Ok(Some(RoomOwner {
            room_id: room_id.to_owned(),
            name: h.get("name").filter(|n| !n.is_empty()).cloned(),
            lost: h.get("status").is_some_and(|s| s == "lost"),
            node,
            url,
        }))
    }

    /// The room id a name names, if any.
    pub async fn room_by_name(&self, name: &str) -> Result<Option<String>, StoreError> {
        let mut c = self.conn().await?;
        Ok(redis::cmd("GET").arg(format!("{PREFIX}name:{name}")).query_async(&mut c).await?)
    }

    /// The owner of a room given by id or, failing that, by name.
    pub async fn owner_by_id_or_name(&self, room: &str) -> Result<Option<RoomOwner>, StoreError> {
        if let Some(o) = self.owner(room).await? {
            return Ok(Some(o));
        }
        match self.room_by_name(room).await? {
            Some(id) => self.owner(&id).await,
            None => Ok(None),
        }
    }
}

impl Store {
    /// Delete a node's record (it leaves at shutdown); the next reap forgets it.
    pub async fn remove_node(&self, node: &str) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let _: i64 = redis::cmd("DEL").arg(format!("{PREFIX}node:{node}")).query_async(&mut c).await?;
        Ok(())
    }
}

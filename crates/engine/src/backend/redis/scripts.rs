//! The Lua scripts that make each change to a channel one atomic call.

/// KEYS: seq, epoch, confirmed. ARGV: an epoch to give the channel if it has none,
/// `1` when publications wait for replicas (the position is then the last one they
/// confirmed, never one a failover could take back).
pub(super) const OPEN: &str = r"
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
end
local last = KEYS[1]
if ARGV[2] == '1' then last = KEYS[3] end
return {tostring(redis.call('GET', last) or 0), epoch}
";

/// KEYS: confirmed. ARGV: id, the channel's Pub/Sub channel, the payload, the command
/// that publishes. A publication its replicas confirmed: the channel's confirmed
/// position moves up to it, and it is published.
pub(super) const CONFIRM: &str = r"
local id = tonumber(ARGV[1])
if id > tonumber(redis.call('GET', KEYS[1]) or 0) then redis.call('SET', KEYS[1], id) end
redis.call(ARGV[4], ARGV[2], ARGV[3])
return 1
";

/// KEYS: epoch. ARGV: the epoch a node found untrustworthy, a new one. Replaces it
/// unless another node did already; returns the epoch now.
pub(super) const RENEW: &str = r"
local epoch = redis.call('GET', KEYS[1])
if not epoch or epoch == ARGV[1] then
  epoch = ARGV[2]
  redis.call('SET', KEYS[1], epoch)
end
return epoch
";

/// KEYS: seq, epoch, history, nonces, nonce-times. ARGV: record, Pub/Sub channel, an
/// epoch to give the channel if it has none, history size (-1: all), history TTL in ms
/// (0: forever), now in ms, nonce TTL in ms, the nonce's field ('' without one), the
/// command that publishes (`PUBLISH`, or `SPUBLISH` in a Redis Cluster; empty when the
/// publication waits for replicas: the node publishes it once they confirmed it). A
/// stored publication answers `1`, its id and the epoch; a known nonce `0` and the id
/// (when waiting for replicas, after a write of nothing, so that the `WAIT` that
/// follows covers the original's write too).
pub(super) const POST: &str = r"
local record, channel, fresh = ARGV[1], ARGV[2], ARGV[3]
local size, ttl, now, nonce_ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local field, publish = ARGV[8], ARGV[9]
local forgotten = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', '(' .. (now - nonce_ttl), 'LIMIT', 0, 64)
if #forgotten > 0 then
  redis.call('HDEL', KEYS[4], unpack(forgotten))
  redis.call('ZREM', KEYS[5], unpack(forgotten))
end
if field ~= '' then
  local known = redis.call('HGET', KEYS[4], field)
  local taken = tonumber(redis.call('ZSCORE', KEYS[5], field))
  if known and not (taken and taken < now - nonce_ttl) then
    if publish == '' then redis.call('INCRBY', KEYS[1], 0) end
    return {'0', known}
  end
end
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = fresh
  redis.call('SET', KEYS[2], epoch)
end
local id = redis.call('INCR', KEYS[1])
if size == 0 then
  redis.call('DEL', KEYS[3])
else
  local added = redis.pcall('XADD', KEYS[3], id .. '-0', 'm', record, 't', now)
  if type(added) == 'table' and added.err then
    -- The counter fell behind the stream (its key was lost, the stream kept): go on
    -- above the stream's last entry.
    local top = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)[1]
    id = tonumber(string.match(top[1], '^(%d+)')) + 1
    redis.call('SET', KEYS[1], id)
    redis.call('XADD', KEYS[3], id .. '-0', 'm', record, 't', now)
  end
  if size > 0 then redis.call('XTRIM', KEYS[3], 'MAXLEN', size) end
  if ttl > 0 then
    local oldest = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 64)
    local expired = nil
    for _, entry in ipairs(oldest) do
      local fields, at = entry[2], nil
      for i = 1, #fields, 2 do
        if fields[i] == 't' then at = tonumber(fields[i + 1]) end
      end
      if at == nil or at >= now - ttl then break end
      expired = entry[1]
    end
    if expired then
      local n = string.match(expired, '^(%d+)')
      redis.call('XTRIM', KEYS[3], 'MINID', n .. '-1')
    end
    redis.call('PEXPIRE', KEYS[3], ttl)
  end
end
if field ~= '' then
  redis.call('HSET', KEYS[4], field, id)
  redis.call('ZADD', KEYS[5], now, field)
end
if publish ~= '' then
  redis.call(publish, channel, 'M' .. id .. '\n' .. epoch .. '\n' .. record)
end
return {'1', tostring(id), epoch}
";

/// One channel's presence, atomically: every key is the channel's (one hash slot).
/// KEYS: presence (user to the number of nodes it is on), pinfo (user to what it said
/// of itself), this node's entries here (a set of users; the empty user is the node's
/// occupancy: it has members here), occupancy (the number of nodes with members),
/// hooks, hooks:pending, hooks:seq. ARGV: mode (join, leave, sync, reap), hooks (`1`:
/// record them), the publishing command, the channel's Pub/Sub channel, the channel's
/// name, then users.
///
/// A user's join or leave publishes only when its first node joins or its last node
/// leaves. A join may add what the member says of itself (`info`, JSON, kept while the
/// user is present and carried in the `Pjoin` message). `sync` makes the node's entries
/// exactly the users given (after an outage); `reap` removes them all (a node that
/// stopped: the caller found its `alive` key gone). With hooks, every first join and
/// last leave of a user or of the channel's occupancy is recorded once, here: arrivals
/// in `hooks`, leaves in `hooks:pending` (by when they happened, until they are due),
/// where an arrival of the same user or occupancy cancels a leave still waiting and is
/// itself not recorded.
///
/// Returns, first, six flags: whether the channel got its first user, whether it lost
/// its last, whether this node has no entries here any more, whether hooks were
/// recorded, whether the channel got its first node with members, whether it lost its
/// last; then, for a join, the channel's users, each followed by its info (or an empty
/// string).
pub(super) const PRESENCE: &str = r"
local mode, hooks, publish, room, name = ARGV[1], ARGV[2] == '1', ARGV[3], ARGV[4], ARGV[5]
local presence, pinfo, mine, occupancy = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local list, pending, seq = KEYS[5], KEYS[6], KEYS[7]
local recorded = false
local before = redis.call('HLEN', presence)
local held = tonumber(redis.call('GET', occupancy) or 0)
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function arrived(kind, leave, user)
  if not hooks then return end
  if redis.call('ZREM', pending, leave .. '\n' .. name .. '\n' .. user) == 1 then
    return
  end
  if redis.call('LLEN', list) >= 100000 then return end
  local hook = {kind = kind, channel = name, time_ms = now_ms()}
  if user ~= '' then hook.user = user end
  local id = redis.call('INCR', seq)
  redis.call('RPUSH', list, id .. '\n' .. cjson.encode(hook))
  recorded = true
end
local function departed(kind, user)
  if not hooks then return end
  redis.call('ZADD', pending, now_ms(), kind .. '\n' .. name .. '\n' .. user)
  recorded = true
end
local function join(user, info)
  if redis.call('SADD', mine, user) == 0 then return end
  if user == '' then
    if redis.call('INCR', occupancy) == 1 then
      arrived('channel_occupied', 'channel_vacated', '')
    end
    return
  end
  if info ~= '' then redis.call('HSET', pinfo, user, info) end
  if redis.call('HINCRBY', presence, user, 1) == 1 then
    redis.call(publish, room, 'Pjoin\n' .. user .. '\n' .. info)
    arrived('member_added', 'member_removed', user)
  end
end
local function leave(user)
  if redis.call('SREM', mine, user) == 0 then return end
  if user == '' then
    if redis.call('DECR', occupancy) <= 0 then
      redis.call('DEL', occupancy)
      departed('channel_vacated', '')
    end
    return
  end
  if redis.call('HINCRBY', presence, user, -1) <= 0 then
    redis.call('HDEL', presence, user)
    redis.call('HDEL', pinfo, user)
    redis.call(publish, room, 'Pleave\n' .. user)
    departed('member_removed', user)
  end
end
local present = {}
if mode == 'join' then
  join(ARGV[6], ARGV[7] or '')
  for _, user in ipairs(redis.call('HKEYS', presence)) do
    table.insert(present, user)
    table.insert(present, redis.call('HGET', pinfo, user) or '')
  end
elseif mode == 'leave' then
  leave(ARGV[6])
elseif mode == 'sync' then
  local want = {}
  for i = 6, #ARGV do want[ARGV[i]] = true end
  for _, user in ipairs(redis.call('SMEMBERS', mine)) do
    if not want[user] then leave(user) end
  end
  for i = 6, #ARGV do join(ARGV[i], '') end
elseif mode == 'reap' then
  for _, user in ipairs(redis.call('SMEMBERS', mine)) do leave(user) end
  redis.call('DEL', mine)
end
local after = redis.call('HLEN', presence)
local holds = tonumber(redis.call('GET', occupancy) or 0)
local flags = {
  (before == 0 and after > 0) and '1' or '0',
  (before > 0 and after == 0) and '1' or '0',
  redis.call('SCARD', mine) == 0 and '1' or '0',
  recorded and '1' or '0',
  (held <= 0 and holds > 0) and '1' or '0',
  (held > 0 and holds <= 0) and '1' or '0',
}
for _, item in ipairs(present) do table.insert(flags, item) end
return flags
";

/// One channel's hooks, atomically, on Redis's clock (`TIME`), whatever the nodes'
/// clocks say. KEYS: hooks (due, in order), hooks:pending (leaves waiting out their
/// delay, by when they happened), hooks:leased (taken, by when their lease ends),
/// hooks:seq. ARGV: mode, then:
/// - `take`, delay (ms), lease (ms), max: each pending leave that is due (the time it
///   happened plus the delay is past) moves to the list, once, oldest first (a vacancy
///   after the removals of the same moment); leased hooks whose lease ran out go back
///   to the front; then up to `max` from the front are leased and returned;
/// - `keep`, lease (ms), ticket: a leased hook's lease is renewed;
/// - `done`, ticket: a leased hook leaves;
/// - `record`, json: a door's hook joins the list;
/// - `count`: nothing changes.
///
/// Returns, first, how many hooks the channel still has waiting (due and pending) and
/// whether it has any at all (leased included), then what was taken.
pub(super) const HOOKS: &str = r"
local list, pending, leased, seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local mode = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local taken = {}
if mode == 'take' then
  local delay, lease, max = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local due = redis.call('ZRANGEBYSCORE', pending, '-inf', now - delay, 'WITHSCORES')
  local leaves = {}
  for i = 1, #due, 2 do
    table.insert(leaves, {name = due[i], at = tonumber(due[i + 1])})
  end
  table.sort(leaves, function(a, b)
    if a.at ~= b.at then return a.at < b.at end
    local av = string.sub(a.name, 1, 15) == 'channel_vacated'
    local bv = string.sub(b.name, 1, 15) == 'channel_vacated'
    if av ~= bv then return bv end
    return a.name < b.name
  end)
  for _, leave in ipairs(leaves) do
    redis.call('ZREM', pending, leave.name)
    local first = string.find(leave.name, '\n', 1, true)
    local second = string.find(leave.name, '\n', first + 1, true)
    local hook = {kind = string.sub(leave.name, 1, first - 1),
                  channel = string.sub(leave.name, first + 1, second - 1),
                  time_ms = leave.at}
    local user = string.sub(leave.name, second + 1)
    if user ~= '' then hook.user = user end
    local id = redis.call('INCR', seq)
    redis.call('RPUSH', list, id .. '\n' .. cjson.encode(hook))
  end
  local expired = redis.call('ZRANGEBYSCORE', leased, '-inf', now)
  for i = #expired, 1, -1 do
    redis.call('ZREM', leased, expired[i])
    redis.call('LPUSH', list, expired[i])
  end
  taken = redis.call('LPOP', list, max) or {}
  for _, item in ipairs(taken) do redis.call('ZADD', leased, now + lease, item) end
elseif mode == 'keep' then
  redis.call('ZADD', leased, 'XX', now + tonumber(ARGV[2]), ARGV[3])
elseif mode == 'done' then
  redis.call('ZREM', leased, ARGV[2])
elseif mode == 'record' then
  if redis.call('LLEN', list) < 100000 then
    local id = redis.call('INCR', seq)
    redis.call('RPUSH', list, id .. '\n' .. ARGV[2])
  else
    taken = {'dropped'}
  end
end
local waiting = redis.call('LLEN', list) + redis.call('ZCARD', pending)
local any = waiting + redis.call('ZCARD', leased) > 0
local answer = {tostring(waiting), any and '1' or '0'}
for _, item in ipairs(taken) do table.insert(answer, item) end
return answer
";

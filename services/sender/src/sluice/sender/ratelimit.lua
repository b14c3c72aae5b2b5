-- One provider's limits, checked and reserved atomically (see ratelimit.py for the model).
--
-- Two dimensions, each a token bucket (sustained rate, capacity = burst) plus an exact
-- sliding window (at most `burst` in any `window` µs):
--   messages  (KEYS 1-3)  what the provider counts as sends (messages, recipients)
--   requests  (KEYS 4-6)  API calls, counted from the request shape the caller passes
--                         (how many messages each planned call carries, in order)
-- plus a rolling 24-hour quota of messages (KEY 8, hour buckets) and an adaptive state
-- (KEY 7) shared by every sender: a factor that scales both dimensions' rates and bursts,
-- cut in half when the provider throttles anyway and recovering linearly (AIMD); a pause
-- until the provider's retry-after (or its quota's or window's reset); a request rate the
-- provider published in headers.
-- A limit of 0 is off. Time comes from Redis TIME so every sender shares one clock.
--
-- KEYS[1] HASH msg bucket {u = µtokens, ts}  KEYS[2] ZSET msg window  KEYS[3] HASH msg sum
-- KEYS[4] HASH req bucket                    KEYS[5] ZSET req window  KEYS[6] HASH req sum
-- KEYS[7] HASH adapt {f = factor µ, ts = last cut µs, pause = µs, pub = published req/s µ,
--                     pub_until = µs}
-- KEYS[8] HASH quota {<hour index> = messages granted in that hour}
-- All carry the same {provider} hash tag, so the script touches one cluster slot.
--
-- ARGV: 1 mode ("acquire" | "peek" | "report")  2 now µs ("" = Redis TIME; tests only)
--       3 n (messages in all)  4 k (runs in the request shape)  5 msg rate  6 msg burst
--       7 req rate  8 req burst  9 daily quota
--       10 window µs  11 recovery (factor per second)  12 floor factor
--       report only: 13 retry-after µs (0 = none)  14 published req/s µ (0 = none)
--                    15 cooldown µs between cuts  16 "1" when the provider throttled
--                    (cut the factor), "0" when it only published its limits
--       acquire/peek only: 13 .. 12+2k the request shape run-length encoded: size, count
--                    pairs (100, 4, 20, 1 = four calls of 100 then one of 20), in order
--
-- acquire/peek return {granted, requests, retry_us, msg_u, msg_avail, req_u, req_avail,
-- quota_used, factor_u, pause_us, pub_u, now}; -1 marks a limit that is off.
-- report returns {factor_u, pause_us, now}.

local UNIT = 1000000
local HOUR = 3600 * UNIT
local TTL_SLACK_MS = 1000

local mode = ARGV[1]
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * UNIT + tonumber(t[2])
end
local n = tonumber(ARGV[3])
local shape_runs = tonumber(ARGV[4])
local msg_rate, msg_burst = tonumber(ARGV[5]), tonumber(ARGV[6])
local req_rate, req_burst = tonumber(ARGV[7]), tonumber(ARGV[8])
local quota = tonumber(ARGV[9])
local window = tonumber(ARGV[10])
local recovery = tonumber(ARGV[11])
local floor_f = tonumber(ARGV[12])
-- peek computes the same grant and retry-after as acquire but writes nothing.
local peek = mode == 'peek'

local function fmt(v) return string.format('%d', v) end

-- Adaptive state: the factor recovers lazily from the last cut, so nothing is written
-- while it recovers.
local st = redis.call('HMGET', KEYS[7], 'f', 'ts', 'pause', 'pub', 'pub_until')
local f_cut, cut_ts = tonumber(st[1]), tonumber(st[2])
local pause = tonumber(st[3]) or 0
local pub, pub_until = tonumber(st[4]) or 0, tonumber(st[5]) or 0
local factor = 1
if f_cut and cut_ts then
  factor = math.min(1, f_cut / UNIT + recovery * math.max(0, now - cut_ts) / UNIT)
end
if pub_until <= now then pub = 0 end

if mode == 'report' then
  local retry_us, pub_arg, cooldown = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
  local throttled = ARGV[16] == '1'
  -- Many messages of one throttled burst report together: cut once per cooldown.
  if throttled and (not cut_ts or now - cut_ts >= cooldown) then
    factor = math.max(floor_f, factor / 2)
    cut_ts = now
    redis.call('HSET', KEYS[7], 'f', fmt(math.floor(factor * UNIT)), 'ts', fmt(now))
  end
  if retry_us > 0 and now + retry_us > pause then
    pause = now + retry_us
    redis.call('HSET', KEYS[7], 'pause', fmt(pause))
  end
  if pub_arg > 0 then
    pub = pub_arg
    pub_until = now + HOUR
    redis.call('HSET', KEYS[7], 'pub', fmt(pub), 'pub_until', fmt(pub_until))
  end
  local recovered = now + math.ceil((1 - factor) / recovery * UNIT)
  local last = math.max(recovered, pause, pub_until)
  redis.call('PEXPIRE', KEYS[7], math.ceil((last - now) / 1000) + TTL_SLACK_MS)
  return {math.floor(factor * UNIT), math.max(0, pause - now), now}
end

-- Effective limits: a published request rate caps (or, when none is configured, sets)
-- the request rate, and its whole requests per second cap the request burst (the
-- provider counts its limit per window: more at once would be refused); then
-- everything is scaled by the factor.
local function scaled_burst(b)
  if b <= 0 then return 0 end
  return math.max(1, math.floor(b * factor))
end
if pub > 0 then
  local pub_rate = pub / UNIT
  local pub_burst = math.max(1, math.floor(pub_rate))
  if req_rate <= 0 or pub_rate < req_rate then req_rate = pub_rate end
  if req_burst <= 0 or pub_burst < req_burst then req_burst = pub_burst end
end
msg_rate = msg_rate * factor
msg_burst = scaled_burst(msg_burst)
req_rate = req_rate * factor
req_burst = scaled_burst(req_burst)

local granted = n
local paused = pause > now
if paused then granted = 0 end

-- A token bucket: returns µtokens now, its capacity in µtokens and the refill origin.
local function bucket(key, rate, burst)
  local cap = burst
  if cap <= 0 then cap = rate end
  if cap < 1 then cap = 1 end
  local cap_u = math.floor(cap * UNIT)
  local s = redis.call('HMGET', key, 'u', 'ts')
  local tokens, ts = tonumber(s[1]), tonumber(s[2])
  local last = now
  if tokens == nil or ts == nil then
    tokens = cap_u  -- idle long enough for the key to expire means full
  elseif now > ts then
    tokens = math.min(cap_u, tokens + math.floor((now - ts) * rate))
  else
    tokens = math.min(cap_u, tokens)
    last = ts  -- clock went back (failover): never refill the same interval twice
  end
  return tokens, cap_u, last
end

local function member_n(member)
  return tonumber(string.match(member, '^%d+:(%d+):')) or 0
end

-- A sliding window: returns the sum still inside it and whether expired grants were pruned.
local function window_sum(zkey, skey)
  local sum = tonumber(redis.call('HGET', skey, 'sum'))
  if sum == nil then
    sum = 0  -- lost (evicted) while members remain: rebuild rather than under-count
    for _, m in ipairs(redis.call('ZRANGE', zkey, 0, -1)) do sum = sum + member_n(m) end
  end
  local expired = redis.call('ZRANGEBYSCORE', zkey, '-inf', now - window)
  for _, m in ipairs(expired) do sum = sum - member_n(m) end
  local pruned = false
  if #expired > 0 and not peek then
    redis.call('ZREMRANGEBYSCORE', zkey, '-inf', now - window)
    pruned = true
    if redis.call('ZCARD', zkey) == 0 then sum = 0 end
  end
  return math.max(sum, 0), pruned
end

local function window_wait(zkey)
  -- The oldest grant still inside the window (a peek has not pruned the expired ones).
  local oldest = redis.call('ZRANGEBYSCORE', zkey, '(' .. fmt(now - window), '+inf',
    'WITHSCORES', 'LIMIT', 0, 1)
  if oldest[2] then return tonumber(oldest[2]) + window - now end
  return window
end

-- Takes `take` from a bucket and its window; returns the state after (written unless peek).
local function commit(bkey, zkey, skey, rate, burst, tokens, cap_u, last, sum, pruned, take)
  if peek then
    if rate > 0 then tokens = tokens - take * UNIT end
    return tokens, sum + take
  end
  if rate > 0 and take > 0 then
    tokens = tokens - take * UNIT
    redis.call('HSET', bkey, 'u', fmt(tokens), 'ts', fmt(last))
    redis.call('PEXPIRE', bkey, math.ceil((cap_u - tokens) / rate / 1000) + TTL_SLACK_MS)
  end
  if burst > 0 and (take > 0 or pruned) then
    if take > 0 then
      local seq = redis.call('HINCRBY', skey, 'seq', 1)
      redis.call('ZADD', zkey, now, string.format('%d:%d:%d', now, take, seq))
      sum = sum + take
    end
    redis.call('HSET', skey, 'sum', sum)
    local ttl = math.ceil(window / 1000) + TTL_SLACK_MS
    redis.call('PEXPIRE', zkey, ttl)
    redis.call('PEXPIRE', skey, ttl)
  end
  return tokens, sum
end

-- Messages.
local m_tok, m_cap, m_last, m_sum, m_pruned = -1, 0, now, 0, false
if msg_rate > 0 then
  m_tok, m_cap, m_last = bucket(KEYS[1], msg_rate, msg_burst)
  granted = math.min(granted, math.floor(m_tok / UNIT))
end
if msg_burst > 0 then
  m_sum, m_pruned = window_sum(KEYS[2], KEYS[3])
  granted = math.min(granted, math.max(0, msg_burst - m_sum))
end

-- Rolling 24 hours in hour buckets: counts leave a whole hour late (conservative).
local used = 0
local hour = math.floor(now / HOUR)
if quota > 0 then
  local raw = redis.call('HGETALL', KEYS[8])
  for i = 1, #raw, 2 do
    local h = tonumber(raw[i])
    if h <= hour - 24 then
      if not peek then redis.call('HDEL', KEYS[8], raw[i]) end
    else
      used = used + tonumber(raw[i + 1])
    end
  end
  granted = math.min(granted, math.max(0, quota - used))
end

-- Requests: the planned calls in order, whole while both request limits and the messages
-- granted so far allow; when the messages run out inside a call, that call is cut to
-- what is left (fewer messages in the same call, as the adapter would plan them).
local r_tok, r_cap, r_last, r_sum, r_pruned = -1, 0, now, 0, false
local r_room = nil
if req_rate > 0 then
  r_tok, r_cap, r_last = bucket(KEYS[4], req_rate, req_burst)
  r_room = math.floor(r_tok / UNIT)
end
if req_burst > 0 then
  r_sum, r_pruned = window_sum(KEYS[5], KEYS[6])
  local room = math.max(0, req_burst - r_sum)
  if r_room == nil or room < r_room then r_room = room end
end
local m_room = granted
local requests = 0
granted = 0
for i = 1, shape_runs do
  local size, count = tonumber(ARGV[11 + 2 * i]), tonumber(ARGV[12 + 2 * i])
  local take = math.min(count, math.floor((m_room - granted) / size))
  if r_room ~= nil then take = math.min(take, r_room - requests) end
  granted = granted + take * size
  requests = requests + take
  if take < count then
    if m_room > granted and (r_room == nil or requests < r_room) then
      granted = m_room  -- the messages ran out inside this call: send it shorter
      requests = requests + 1
    end
    break
  end
end
if granted <= 0 then granted, requests = 0, 0 end

-- What a peek reports as available is the state before the (simulated) grant.
local m_tok0, m_sum0, r_tok0, r_sum0, used0 = m_tok, m_sum, r_tok, r_sum, used
m_tok, m_sum = commit(KEYS[1], KEYS[2], KEYS[3], msg_rate, msg_burst,
  m_tok, m_cap, m_last, m_sum, m_pruned, granted)
r_tok, r_sum = commit(KEYS[4], KEYS[5], KEYS[6], req_rate, req_burst,
  r_tok, r_cap, r_last, r_sum, r_pruned, requests)
if quota > 0 and granted > 0 then
  if not peek then
    redis.call('HINCRBY', KEYS[8], fmt(hour), granted)
    redis.call('PEXPIRE', KEYS[8], 25 * 3600 * 1000)
  end
  used = used + granted
end

-- When fewer than asked were granted: how long until every exhausted limit allows one
-- more message in a new request. Waits are rounded up (+1 µs against float rounding).
local retry = 0
if granted < n then
  if paused then retry = pause - now end
  local function wait_bucket(tokens, rate)
    if rate > 0 and tokens < UNIT then
      retry = math.max(retry, math.ceil((UNIT - tokens) / rate) + 1)
    end
  end
  wait_bucket(m_tok, msg_rate)
  wait_bucket(r_tok, req_rate)
  if msg_burst > 0 and msg_burst - m_sum < 1 then retry = math.max(retry, window_wait(KEYS[2])) end
  if req_burst > 0 and req_burst - r_sum < 1 then retry = math.max(retry, window_wait(KEYS[5])) end
  if quota > 0 and used >= quota then
    local oldest = hour
    for i, v in ipairs(redis.call('HKEYS', KEYS[8])) do
      local h = tonumber(v)
      if h > hour - 24 and h < oldest then oldest = h end
    end
    retry = math.max(retry, (oldest + 24) * HOUR - now)
  end
  if retry <= 0 then retry = 1 end
end

if peek then m_tok, m_sum, r_tok, r_sum, used = m_tok0, m_sum0, r_tok0, r_sum0, used0 end
local function off(v, on) if on then return v end return -1 end
return {granted, requests, retry,
  off(m_tok, msg_rate > 0), off(math.max(0, msg_burst - m_sum), msg_burst > 0),
  off(r_tok, req_rate > 0), off(math.max(0, req_burst - r_sum), req_burst > 0),
  off(used, quota > 0), math.floor(factor * UNIT), math.max(0, pause - now), pub, now}

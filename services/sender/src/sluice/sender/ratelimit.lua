-- Reserve up to n sends for one provider, atomically, against both of its limits:
--   burst:     an exact sliding window; at most `burst` messages in any `window` µs
--   sustained: a token bucket refilling at `rate` msgs/s, holding at most `burst`
--              (or `rate` when burst is off, and never less than 1)
-- A limit of 0 is off. Time comes from Redis TIME so every sender shares one clock.
--
-- KEYS[1]  HASH  sustained bucket: u = tokens in µtokens (1e-6 token), ts = last refill µs
-- KEYS[2]  ZSET  burst window: one member "<time_us>:<n>:<seq>" per grant, score = time_us
-- KEYS[3]  HASH  burst window: sum = Σn of the members in KEYS[2], seq = member counter
-- All three carry the same {provider} hash tag, so the script touches one cluster slot.
--
-- ARGV[1] n wanted (ignored by peek)   ARGV[2] rate msgs/s   ARGV[3] burst
-- ARGV[4] window length µs             ARGV[5] "acquire" | "peek" (peek writes nothing)
-- ARGV[6] now µs: tests with a simulated clock only; production passes "" and we call TIME
--
-- Returns {granted, retry_us, tokens_u or -1, burst_available or -1, now_us}.
-- retry_us (only when granted < n) is when both limits allow at least one more message.

local UNIT = 1000000
local TTL_SLACK_MS = 1000

local n = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local peek = ARGV[5] == 'peek'
local now
if ARGV[6] ~= nil and ARGV[6] ~= '' then
  now = tonumber(ARGV[6])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * UNIT + tonumber(t[2])
end
if peek then n = 0 end

-- Lua's `..` and tostring print numbers with %.14g, which mangles µs timestamps; %d is exact.
local function member_n(member)
  return tonumber(string.match(member, '^%d+:(%d+):')) or 0
end

local granted = n

-- Sustained: refill lazily from the elapsed time. Integer µtokens and a floored refill keep
-- the stored value exact; the floor only ever loses < 1 µtoken per write (conservative).
local tokens = -1
local cap_u = 0
local last = now
if rate > 0 then
  local cap = burst
  if cap <= 0 then cap = rate end
  if cap < 1 then cap = 1 end
  cap_u = math.floor(cap * UNIT)
  local state = redis.call('HMGET', KEYS[1], 'u', 'ts')
  tokens = tonumber(state[1])
  local ts = tonumber(state[2])
  if tokens == nil or ts == nil then
    tokens = cap_u  -- idle long enough for the key to expire means full
  elseif now > ts then
    tokens = math.min(cap_u, tokens + math.floor((now - ts) * rate))
  else
    last = ts  -- clock went back (failover): never refill the same interval twice
  end
  local whole = math.floor(tokens / UNIT)
  if whole < granted then granted = whole end
end

-- Burst: drop grants that left the window and subtract them from the running sum, so each
-- grant is added once and removed once (amortised O(1)) instead of re-summing the window.
local avail = -1
local sum = 0
local pruned = false
if burst > 0 then
  local horizon = now - window
  sum = tonumber(redis.call('HGET', KEYS[3], 'sum'))
  if sum == nil then
    -- Sum lost (evicted) while members remain: rebuild it rather than under-count.
    sum = 0
    for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do sum = sum + member_n(m) end
  end
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', horizon)
  for _, m in ipairs(expired) do sum = sum - member_n(m) end
  if #expired > 0 and not peek then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', horizon)
    pruned = true
    if redis.call('ZCARD', KEYS[2]) == 0 then sum = 0 end  -- self-heal any drift
  end
  if sum < 0 then sum = 0 end
  avail = burst - sum
  if avail < 0 then avail = 0 end
  if avail < granted then granted = avail end
end
if granted < 0 then granted = 0 end

if not peek then
  -- A zero grant changes nothing but pruning, so throttled polls stay nearly read-only.
  if rate > 0 and granted > 0 then
    tokens = tokens - granted * UNIT
    redis.call('HSET', KEYS[1], 'u', string.format('%d', tokens), 'ts', string.format('%d', last))
    -- Once full again the state equals a missing key, so let it vanish then.
    local full_ms = math.ceil((cap_u - tokens) / rate / 1000)
    redis.call('PEXPIRE', KEYS[1], full_ms + TTL_SLACK_MS)
  end
  if burst > 0 and (granted > 0 or pruned) then
    if granted > 0 then
      local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
      redis.call('ZADD', KEYS[2], now, string.format('%d:%d:%d', now, granted, seq))
      sum = sum + granted
      avail = avail - granted
    end
    redis.call('HSET', KEYS[3], 'sum', sum)
    -- Every member leaves the window after `window` µs; then both keys are dead weight.
    local ttl = math.ceil(window / 1000) + TTL_SLACK_MS
    redis.call('PEXPIRE', KEYS[2], ttl)
    redis.call('PEXPIRE', KEYS[3], ttl)
  end
end

local retry = 0
if granted < n then
  if rate > 0 and tokens < UNIT then
    -- (1 - fractional tokens) / rate, rounded up, +1 µs against float rounding in the refill.
    retry = math.ceil((UNIT - tokens) / rate) + 1
  end
  if burst > 0 and avail < 1 then
    -- The window frees room when its oldest grant leaves: at score + window.
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    local wait = window
    if oldest[2] then wait = tonumber(oldest[2]) + window - now end
    if wait > retry then retry = wait end
  end
end

return {granted, retry, tokens, avail, now}

-- kvroute layout 1 -- store: (pod, tier) now holds these blocks.
--
-- The blocks come in groups, one group per cluster slot: the group's block
-- keys all hash to that slot and its two bookkeeping keys carry a {tag}
-- chosen to hash to it. Every key is declared in KEYS. On Redis Cluster the
-- client sends ONE group per call (a script may only touch one slot there);
-- on a single node it packs many groups into one call, which saves the
-- per-call cost of EVALSHA without changing what is written. The engine:
-- mapping itself lives in another slot; the client writes it in the same
-- pipeline.
--
-- KEYS, per group, in order:
--   kvroute:{tag}:pod:<pod>  HASH "<tier>|<model>@<key>" -> ""
--   kvroute:{tag}:engine     HASH "<model>@<key>" -> engine hash
--   <model>@<key> x n        HASH "<pod>@<tier>" -> ""
-- ARGV[1]     "<pod>@<tier>"
-- ARGV[2]     tier
-- ARGV[3]     model
-- ARGV[4..]   per group, in order: n, then the engine hash of each of its n
--             blocks ("" when it equals the key)
--
-- Returns { fresh_1 .. fresh_G, released... } (G groups):
--   fresh_g   1 when the pod held nothing in group g's slot before the call:
--             the client then makes sure the slot's tag is in
--             kvroute:pod:<pod>:slots (it may have been lost with a FLUSHALL
--             or a Redis restart while the client's cache still had it);
--   released  engine: keys whose mapping this call replaced (the block now
--             maps another engine hash); the client deletes them.
-- Storing a (pod, tier) a block already has is a no-op.
local field, tier, model = ARGV[1], ARGV[2], ARGV[3]
local out = {}
local released = {}
local k, a = 1, 4
while a <= #ARGV do
  local podset, rev = KEYS[k], KEYS[k + 1]
  local n = tonumber(ARGV[a])
  if redis.call('EXISTS', podset) == 0 then
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
  for j = 1, n do
    local block = KEYS[k + 1 + j]
    redis.call('HSET', block, field, '')
    redis.call('HSET', podset, tier .. '|' .. block, '')
    local engine = ARGV[a + j]
    if engine ~= '' then
      local old = redis.call('HGET', rev, block)
      if old ~= engine then
        redis.call('HSET', rev, block, engine)
        if old then
          released[#released + 1] = 'engine:' .. model .. '@' .. old
        end
      end
    end
  end
  k = k + 2 + n
  a = a + 1 + n
end
for _, name in ipairs(released) do
  out[#out + 1] = name
end
return out

-- kvroute layout 1 -- store: (pod, tier) now holds these blocks.
--
-- One call touches ONE cluster slot: the block keys below all hash to it and
-- the two bookkeeping keys carry a {tag} chosen to hash to it. Every key is
-- declared in KEYS. The engine: mapping itself lives in another slot; the
-- client writes it in the same pipeline.
--
-- KEYS[1]     kvroute:{tag}:pod:<pod>  HASH "<tier>|<model>@<key>" -> ""
-- KEYS[2]     kvroute:{tag}:engine     HASH "<model>@<key>" -> engine hash
-- KEYS[3..n]  <model>@<key>            HASH "<pod>@<tier>" -> ""
-- ARGV[1]     "<pod>@<tier>"
-- ARGV[2]     tier
-- ARGV[3]     model
-- ARGV[i+1]   engine hash of KEYS[i] (i >= 3), "" when it equals the key
--
-- Returns { fresh, released... }:
--   fresh     1 when the pod held nothing in this slot before the call: the
--             client then makes sure the slot's tag is in
--             kvroute:pod:<pod>:slots (it may have been lost with a FLUSHALL
--             or a Redis restart while the client's cache still had it);
--   released  engine: keys whose mapping this call replaced (the block now
--             maps another engine hash); the client deletes them.
-- Storing a (pod, tier) a block already has is a no-op.
local podset, rev = KEYS[1], KEYS[2]
local field, tier, model = ARGV[1], ARGV[2], ARGV[3]
local fresh = 0
if redis.call('EXISTS', podset) == 0 then
  fresh = 1
end
local out = { fresh }
for i = 3, #KEYS do
  local block = KEYS[i]
  redis.call('HSET', block, field, '')
  redis.call('HSET', podset, tier .. '|' .. block, '')
  local engine = ARGV[i + 1]
  if engine ~= '' then
    local old = redis.call('HGET', rev, block)
    if old ~= engine then
      redis.call('HSET', rev, block, engine)
      if old then
        out[#out + 1] = 'engine:' .. model .. '@' .. old
      end
    end
  end
end
return out

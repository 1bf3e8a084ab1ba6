-- kvroute layout 1 -- clear_pod: a pod lost everything it held in one slot.
--
-- The client read the pod's entries of this slot (HKEYS
-- kvroute:{tag}:pod:<pod>) and declares every block they name in KEYS, so the
-- call touches ONE slot and only declared keys, without SCAN. Entries a
-- concurrent store adds after that read are kept: they happened after the
-- clear.
--
-- KEYS[1]     kvroute:{tag}:pod:<pod>  HASH "<tier>|<model>@<key>" -> ""
-- KEYS[2]     kvroute:{tag}:engine     HASH "<model>@<key>" -> engine hash
-- KEYS[3..n]  <model>@<key>, one per entry (a block held in two tiers twice)
-- ARGV[1]     pod id
-- ARGV[i-1]   tier of the entry of KEYS[i] (i >= 3)
--
-- Returns { released... }: engine: keys of blocks that lost their last holder.
local podset, rev = KEYS[1], KEYS[2]
local pod = ARGV[1]
local out = {}
for i = 3, #KEYS do
  local block, tier = KEYS[i], ARGV[i - 1]
  redis.call('HDEL', podset, tier .. '|' .. block)
  if redis.call('HDEL', block, pod .. '@' .. tier) == 1 and redis.call('EXISTS', block) == 0 then
    local old = redis.call('HGET', rev, block)
    if old then
      redis.call('HDEL', rev, block)
      -- '<model>@<key>': the model is everything before the last '@'.
      local model = string.match(block, '^(.*)@')
      out[#out + 1] = 'engine:' .. model .. '@' .. old
    end
  end
end
return out

-- kvroute layout 1 -- remove: (pod, tier) no longer holds these blocks.
--
-- One call touches ONE cluster slot, every key declared in KEYS (see
-- store.lua). A block left with no holder disappears (Redis deletes an empty
-- HASH) and its reverse engine mapping goes with it; the engine: key lives in
-- another slot, so its name is returned for the client to delete.
--
-- KEYS[1]     kvroute:{tag}:pod:<pod>  HASH "<tier>|<model>@<key>" -> ""
-- KEYS[2]     kvroute:{tag}:engine     HASH "<model>@<key>" -> engine hash
-- KEYS[3..n]  <model>@<key>            HASH "<pod>@<tier>" -> ""
-- ARGV[1]     "<pod>@<tier>"
-- ARGV[2]     tier
-- ARGV[3]     model
--
-- Returns { released... }: engine: keys of blocks that lost their last holder.
-- Removing what the pod does not hold is a no-op.
local podset, rev = KEYS[1], KEYS[2]
local field, tier, model = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 3, #KEYS do
  local block = KEYS[i]
  redis.call('HDEL', podset, tier .. '|' .. block)
  if redis.call('HDEL', block, field) == 1 and redis.call('EXISTS', block) == 0 then
    local old = redis.call('HGET', rev, block)
    if old then
      redis.call('HDEL', rev, block)
      out[#out + 1] = 'engine:' .. model .. '@' .. old
    end
  end
end
return out

-- kvroute layout 1 -- remove: (pod, tier) no longer holds these blocks.
--
-- Groups of blocks, one group per cluster slot, every key declared in KEYS;
-- one group per call on Redis Cluster, many on a single node (see
-- store.lua). A block left with no holder disappears (Redis deletes an empty
-- HASH) and its reverse engine mapping goes with it; the engine: key lives in
-- another slot, so its name is returned for the client to delete.
--
-- KEYS, per group, in order:
--   kvroute:{tag}:pod:<pod>  HASH "<tier>|<model>@<key>" -> ""
--   kvroute:{tag}:engine     HASH "<model>@<key>" -> engine hash
--   <model>@<key> x n        HASH "<pod>@<tier>" -> ""
-- ARGV[1]     "<pod>@<tier>"
-- ARGV[2]     tier
-- ARGV[3]     model
-- ARGV[4..]   n of each group, in order
--
-- Returns { released... }: engine: keys of blocks that lost their last holder.
-- Removing what the pod does not hold is a no-op.
local field, tier, model = ARGV[1], ARGV[2], ARGV[3]
local out = {}
local k = 1
for g = 4, #ARGV do
  local podset, rev = KEYS[k], KEYS[k + 1]
  local n = tonumber(ARGV[g])
  for j = 1, n do
    local block = KEYS[k + 1 + j]
    redis.call('HDEL', podset, tier .. '|' .. block)
    if redis.call('HDEL', block, field) == 1 and redis.call('EXISTS', block) == 0 then
      local old = redis.call('HGET', rev, block)
      if old then
        redis.call('HDEL', rev, block)
        out[#out + 1] = 'engine:' .. model .. '@' .. old
      end
    end
  end
  k = k + 2 + n
end
return out

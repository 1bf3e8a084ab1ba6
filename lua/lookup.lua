-- kvroute layout 1 -- lookup: the holder sets a prompt's prefix depths
-- depend on, found by bisection on holder counts, in one round trip.
-- READ-ONLY (no write command anywhere below), called with EVALSHA_RO on
-- Redis 7. On a single node it reads the whole prompt. On a cluster the
-- prompt's keys hash to every slot, so the client runs this same text on
-- each master over the blocks that master holds, with a shebang
-- (`no-writes,allow-cross-slot-keys`) and `local KEYS = ARGV` prepended
-- (crates/redis/src/scripts.rs, node_lookup.rs).
--
-- The same algorithm as crates/core/src/index/bisect.rs (which explains why it is
-- exact): it must read exactly the blocks that code reads, so that every
-- backend gives the same answer even on data with holes. Change both or
-- neither.
--
-- KEYS[1..n]  <model>@<key>   the prompt's block keys in prompt order
--                             (block i is KEYS[i + 1]); every key read is
--                             declared here
-- (no ARGV: splits are decided on counts of every field, which HLEN cannot
-- filter by candidate; the client filters candidates and parses fields as
-- it walks the reply)
--
-- Returns { reads, fallbacks, then per read block in increasing order:
--           block, #removed, removed fields..., #added, added fields... }
-- where removed/added are relative to the previous block returned (block 0:
-- nothing removed, every field added). Under the prefix property only
-- removals follow block 0, so the reply is about twice H(0) in size.
local n = #KEYS
-- Locals, not globals: a global lookup per call costs measurably over
-- hundreds of calls (lookup.lua went ~480 -> ~400 µs at 512 blocks x 64
-- depths, BENCHMARKS.md).
local call = redis.call
local counts = {}
counts[n] = 0
local reads = 0
local first_empty = n

-- A count the recursion uses (the client's `Bisection::consume`).
local function count(i)
  local c = call('HLEN', KEYS[i + 1])
  counts[i] = c
  reads = reads + 1
  if c == 0 and i < first_empty then
    first_empty = i
  end
  return c
end

local transitions, linear = {}, {}
count(0)
-- Depth first, left half first: the first empty block is found early and
-- everything after it is skipped. The answer does not depend on the order.
local stack, top = { 0, n }, 2
while top > 0 do
  local a, b = stack[top - 1], stack[top]
  top = top - 2
  local ca, cb = counts[a], counts[b]
  if a < first_empty and ca ~= cb then
    if cb > ca then
      linear[#linear + 1] = { a, b }
    elseif b - a == 1 then
      if b < n then
        transitions[#transitions + 1] = b
      end
    else
      local m = a + (b - a - (b - a) % 2) / 2
      count(m)
      stack[top + 1] = m
      stack[top + 2] = b
      stack[top + 3] = a
      stack[top + 4] = m
      top = top + 4
    end
  end
end

-- The blocks whose holder sets are read: block 0, transitions, every block
-- of an interval whose count grew; none past the first empty block.
local last = math.min(first_empty, n - 1)
local wanted = { [0] = true }
for _, t in ipairs(transitions) do
  if t <= last then
    wanted[t] = true
  end
end
local fallbacks = 0
for _, ab in ipairs(linear) do
  if ab[1] < first_empty then
    fallbacks = fallbacks + 1
  end
  for i = ab[1], math.min(ab[2], last) do
    wanted[i] = true
  end
end
local points = {}
for i in pairs(wanted) do
  points[#points + 1] = i
end
table.sort(points)

-- Fast path, for data that keeps the prefix property (the normal case):
-- read the sets from the deepest point up. While every set read contains
-- every later one, the fields seen so far are exactly the set of the next
-- point, so one table read per field checks the nesting and finds, for
-- each field, the last point that holds it. The reply is then built from
-- those last points (only removals after block 0) without touching any
-- field twice. Any interval read block by block, or any set that does not
-- contain the next one, drops to the general path below, which reads the
-- same blocks again and reports them as they are.
if #linear == 0 then
  local reads_before = reads
  local first, seen, n_seen = nil, {}, 0
  local gone = {}
  local nested = true
  for j = #points, 1, -1 do
    local list = call('HKEYS', KEYS[points[j] + 1])
    reads = reads + 1
    local kept, fresh, n_fresh = 0, nil, 0
    for k = 1, #list do
      local f = list[k]
      if seen[f] then
        kept = kept + 1
      else
        seen[f] = true
        if n_fresh == 0 then
          fresh = {}
        end
        n_fresh = n_fresh + 1
        fresh[n_fresh] = f
      end
    end
    if kept ~= n_seen then
      nested = false
      break
    end
    if n_fresh > 0 then
      n_seen = n_seen + n_fresh
      -- Fields whose last holding point is p leave at the next point.
      gone[j] = fresh
    end
    first = list
  end
  if nested then
    local out = { reads, 0, 0, 0, #first }
    local o = 5
    for k = 1, #first do
      o = o + 1
      out[o] = first[k]
    end
    for j = 2, #points do
      out[o + 1] = points[j]
      local left = gone[j - 1]
      if left == nil then
        out[o + 2] = 0
        o = o + 2
      else
        out[o + 2] = #left
        o = o + 2
        for k = 1, #left do
          o = o + 1
          out[o] = left[k]
        end
      end
      o = o + 1
      out[o] = 0
    end
    return out
  end
  -- The fast path's reads are not counted: the general path reads the
  -- same blocks again, and `reads` must match the other backends'.
  reads = reads_before
end

local out = { 0, 0 }
-- stamp[f] is the last returned block that held field f: a field of the
-- block being returned whose stamp is not the previous block's was added,
-- a field of the previous block whose stamp did not move was removed. One
-- table write per field and one read per previous field, no set per block.
local stamp = {}
local prev_list, prev_block = {}, -1
local function emit(i, list)
  local added, n_added = nil, 0
  for k = 1, #list do
    local f = list[k]
    if stamp[f] ~= prev_block then
      n_added = n_added + 1
      if added == nil then
        added = {}
      end
      added[n_added] = f
    end
    stamp[f] = i
  end
  out[#out + 1] = i
  local at = #out + 1
  out[at] = 0
  local removed = 0
  for k = 1, #prev_list do
    local f = prev_list[k]
    if stamp[f] ~= i then
      removed = removed + 1
      out[#out + 1] = f
    end
  end
  out[at] = removed
  out[#out + 1] = n_added
  for k = 1, n_added do
    out[#out + 1] = added[k]
  end
  prev_list, prev_block = list, i
end
local function read(i)
  reads = reads + 1
  return call('HKEYS', KEYS[i + 1])
end

-- The nesting check (the client's `Sets::gaps`): a read set that is not a
-- subset of the previous read set, more than one block away, means holders
-- appeared in between: read every block between the two.
for _, p in ipairs(points) do
  local list = read(p)
  if p - prev_block >= 2 and prev_block >= 0 then
    for k = 1, #list do
      if stamp[list[k]] ~= prev_block then
        fallbacks = fallbacks + 1
        for j = prev_block + 1, p - 1 do
          emit(j, read(j))
        end
        break
      end
    end
  end
  emit(p, list)
end
out[1] = reads
out[2] = fallbacks
return out

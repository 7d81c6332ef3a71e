-- wrk script for `python -m bench.run`: POST one OpenAI chat completion per request.
--
-- BENCH_TOKEN   the bearer credential (read from the environment, never an argument)
-- BENCH_STREAM  "1" for `"stream": true` (SSE), anything else for a JSON answer
-- BENCH_MODEL   the model asked for (default gpt-4o-mini; claude-haiku-4-5 for the
--               sidecar in the xjson/xstream modes, which it translates to Anthropic)
--
-- The fixed-rate run (bench/pace.py) paces the requests; without BENCH_RATE there is no
-- `delay()` and wrk runs flat out:
-- BENCH_RATE     the requests per second to send, all of wrk's threads together
-- BENCH_THREADS  wrk -t: each thread sends BENCH_RATE / BENCH_THREADS of them
-- Each thread keeps a timetable, one request every `threads * 1000 / rate` ms, read on the
-- monotonic clock (LuaJIT's ffi: `clock_gettime`); the timetables start from one moment,
-- offset from each other by a share of that step, so that the threads' requests interleave.
-- Before each request wrk asks `delay()`, which books the thread's next free time and waits
-- for it. So the rate is the one asked for whatever the answers take,
-- as long as a connection is free when a request is due and the server keeps up.
--
-- The path comes from the URL on wrk's command line. No `response()` hook: defining one
-- makes wrk buffer and hand every body to Lua, which would slow the load generator down.
-- At the end two lines carry what bench/run.py reads: `BENCH-RESULT {json}` (times in
-- microseconds; p50/p99 from the same histogram `wrk --latency` prints) and
-- `BENCH-LATENCY v:c v:c ...`, every latency recorded (µs) with how many requests took it,
-- so that the runs of one measurement can be added together (bench/latency.py).

local token = os.getenv("BENCH_TOKEN") or ""
local stream = os.getenv("BENCH_STREAM") == "1"
local model = os.getenv("BENCH_MODEL") or "gpt-4o-mini"
if model == "" then model = "gpt-4o-mini" end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. token
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user",'
  .. '"content":"Say hello to the benchmark, please."}]'
  .. (stream and ',"stream":true' or '') .. '}'

local rate = tonumber(os.getenv("BENCH_RATE") or "")
if rate and rate > 0 then
  local ffi = require("ffi")
  ffi.cdef([[
    struct bench_timespec { long tv_sec; long tv_nsec; };
    int clock_gettime(int clock, struct bench_timespec *now);
  ]])
  local CLOCK_MONOTONIC = 1
  local clock = ffi.new("struct bench_timespec")
  local function now_ms()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, clock)
    return tonumber(clock.tv_sec) * 1000 + tonumber(clock.tv_nsec) / 1e6
  end

  local threads = tonumber(os.getenv("BENCH_THREADS") or "") or 1
  local every = threads * 1000 / rate -- ms between two requests of one thread
  local numbered = 0
  local start = nil

  -- Runs in the main state, once per thread before it starts: `thread_id` and `epoch` become
  -- globals of that thread's state. `epoch`: one moment for all, a little ahead (the threads
  -- still have to start and connect; a thread later than that catches up at once).
  function setup(thread)
    start = start or now_ms() + 5
    thread:set("thread_id", numbered)
    thread:set("epoch", start)
    numbered = numbered + 1
  end

  local due = nil -- when this thread's next request is due (ms, monotonic)
  function delay()
    local now = now_ms()
    if due == nil then -- the thread's first request: the threads' timetables interleave
      due = (epoch or now) + (thread_id or 0) * every / threads
    end
    local wait = due - now
    due = due + every -- booked: a request that is late (the server stalled) goes at once
    if wait <= 0 then
      return 0
    end
    return math.floor(wait + 0.5) -- wrk waits whole ms; the timetable keeps the rate exact
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH-RESULT {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,'
      .. '"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f,'
      .. '"p50_us":%.0f,"p99_us":%.0f,"mean_us":%.1f,"max_us":%.0f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
  local pairs_ = {}
  for i = 1, #latency do
    local value, count = latency(i)
    pairs_[i] = string.format("%.0f:%.0f", value, count)
  end
  io.write("BENCH-LATENCY " .. table.concat(pairs_, " ") .. "\n")
end

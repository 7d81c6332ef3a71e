-- wrk script for `python -m bench.run`: POST one OpenAI chat completion per request.
--
-- BENCH_TOKEN   the bearer credential (read from the environment, never an argument)
-- BENCH_STREAM  "1" for `"stream": true` (SSE), anything else for a JSON answer
-- BENCH_MODEL   the model asked for (default gpt-4o-mini; claude-haiku-4-5 for the
--               sidecar in the xjson/xstream modes, which it translates to Anthropic)
--
-- The fixed-rate run (bench/pace.py) paces the connections; without BENCH_DELAY_MS there is
-- no `delay()` and wrk runs flat out as before:
-- BENCH_DELAY_MS     ms each connection waits after an answer (a fraction: spread over the
--                    requests, since wrk truncates what `delay()` returns to whole ms)
-- BENCH_INTERVAL_MS  the target time between two requests of a connection; the connections
-- BENCH_CONNECTIONS  start at evenly spread moments of it (wrk -c and -t, to number them),
-- BENCH_THREADS      so that requests arrive spread out, not in bursts of -c
--
-- The path comes from the URL on wrk's command line. No `response()` hook: defining one
-- makes wrk buffer and hand every body to Lua, which would slow the load generator down.
-- At the end one line `BENCH-RESULT {json}` carries what bench/run.py reads
-- (times in microseconds; p50/p99 from the same histogram `wrk --latency` prints).

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

local pace_delay = tonumber(os.getenv("BENCH_DELAY_MS") or "")
if pace_delay then
  local interval = tonumber(os.getenv("BENCH_INTERVAL_MS") or "") or pace_delay
  local connections = tonumber(os.getenv("BENCH_CONNECTIONS") or "") or 1
  local threads = tonumber(os.getenv("BENCH_THREADS") or "") or 1
  local per_thread = math.floor(connections / threads)
  local numbered = 0

  -- Runs in the main state, once per thread: `thread_id` becomes a global of that thread's state.
  function setup(thread)
    thread:set("thread_id", numbered)
    numbered = numbered + 1
  end

  local started = 0 -- connections of this thread given their start so far
  local carry = 0 -- the fractions of a ms not waited yet
  function delay()
    if started < per_thread then -- each connection's first call, as it connects: its start
      local k = started * threads + (thread_id or 0)
      started = started + 1
      return math.floor(k * interval / connections)
    end
    carry = carry + pace_delay
    local whole = math.floor(carry)
    carry = carry - whole
    return whole
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
end

-- wrk script for `python -m bench.run`: POST one OpenAI chat completion per request.
--
-- BENCH_TOKEN   the bearer credential (read from the environment, never an argument)
-- BENCH_STREAM  "1" for `"stream": true` (SSE), anything else for a JSON answer
-- BENCH_MODEL   the model asked for (default gpt-4o-mini; claude-haiku-4-5 for the
--               sidecar in the xjson/xstream modes, which it translates to Anthropic)
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

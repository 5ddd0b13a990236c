-- Runs a stock sysbench test (SB_TEST, e.g. oltp_write_only) unchanged, and writes
-- every SQL error that sysbench ignores and retries (it only counts them as
-- "ignored errors") to stderr, verbatim, so the harness can report them.
local test = os.getenv("SB_TEST") or error("SB_TEST not set")
local dir = os.getenv("SB_LUA_DIR") or "/usr/share/sysbench"
dofile(dir .. "/" .. test .. ".lua")
local prev = sysbench.hooks.before_restart_event
function sysbench.hooks.before_restart_event(errdesc)
   io.stderr:write(string.format("IGNORED_ERROR sqlstate=%s errno=%s: %s [query: %s]\n",
      tostring(errdesc.sql_state), tostring(errdesc.sql_errno),
      tostring(errdesc.sql_errmsg):gsub("\n", " "), tostring(errdesc.query):sub(1, 200)))
   if prev then prev(errdesc) end
end

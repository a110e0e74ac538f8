-- A request with a body, for bench/load.py: the body is the file WRK_BODY_FILE names (read
-- whole: bodies of a megabyte and more), sent with WRK_METHOD (POST unless set); the headers
-- come with wrk's -H. wrk's summary is bench/wrk_report.lua's, whose path WRK_REPORT gives.
wrk.method = os.getenv("WRK_METHOD") or "POST"
local file = assert(io.open(assert(os.getenv("WRK_BODY_FILE"), "WRK_BODY_FILE unset"), "rb"))
wrk.body = file:read("*a")
file:close()
dofile(assert(os.getenv("WRK_REPORT"), "WRK_REPORT unset"))

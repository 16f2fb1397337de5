-- The refusal's SMTP reply as libmilter's MTA side reads it: code, enhanced code and text.
-- miltertest -s reply.lua -D port=PORT

local conn = mt.connect("inet:" .. port .. "@127.0.0.1", 20, 0.25)
if conn == nil then error("cannot connect to the milter") end
if mt.conninfo(conn, "client.example.net", "192.0.2.1") ~= nil then error("conninfo failed") end
if mt.mailfrom(conn, "<>") ~= nil then error("mailfrom failed") end
if mt.rcptto(conn, "<prvs=0000000000=user@example.org>") ~= nil then error("rcptto failed") end
if mt.getreply(conn) ~= SMFIR_REPLYCODE then error("the forged tag was not refused") end
mt.disconnect(conn)
mt.echo("ok")

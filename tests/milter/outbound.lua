-- Outbound from a trusted client (loopback): the milter answers end of message with SMFIR_CHGFROM
-- (miltertest has no check for it, but must read it as a valid end-of-message action) and continue;
-- mail only to a local recipient gets no change at all.
-- miltertest -s outbound.lua -D port=PORT

local conn = mt.connect("inet:" .. port .. "@127.0.0.1", 20, 0.25)
if conn == nil then error("cannot connect to the milter") end
if mt.conninfo(conn, "localhost", "127.0.0.1") ~= nil then error("conninfo failed") end

if mt.mailfrom(conn, "<user@example.org>", "SIZE=100") ~= nil then error("mailfrom failed") end
if mt.rcptto(conn, "<friend@remote.test>") ~= nil then error("rcptto failed") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error("the recipient was refused") end
if mt.eom(conn) ~= nil then error("eom failed") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error("end of message was not continue (a refusal?)") end
if mt.eom_check(conn, MT_RCPTDELETE, "<friend@remote.test>") then error("a recipient was deleted") end

if mt.mailfrom(conn, "<user@example.org>") ~= nil then error("mailfrom failed") end
if mt.rcptto(conn, "<other@example.org>") ~= nil then error("rcptto failed") end
if mt.eom(conn) ~= nil then error("eom failed") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error("end of message was not continue (a refusal?)") end

mt.disconnect(conn)
mt.echo("ok")

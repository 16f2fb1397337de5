-- Inbound, as an MX's smtpd would drive the milter: a forged bounce is refused at RCPT with the policy's
-- own reply, and a genuine one passes, its tag stripped at end of message (DELRCPT, then ADDRCPT).
-- miltertest -s inbound.lua -D port=PORT -D tagged=prvs=...=user@example.org

local conn = mt.connect("inet:" .. port .. "@127.0.0.1", 20, 0.25)
if conn == nil then error("cannot connect to the milter") end

-- The actions we must be able to use; the steps we switched off.
if mt.negotiate(conn, 6, nil, nil) ~= nil then error("negotiation failed") end
for _, act in ipairs({SMFIF_CHGFROM, SMFIF_ADDRCPT, SMFIF_DELRCPT}) do
    if not mt.test_action(conn, act) then error("an action was not negotiated: " .. act) end
end
if mt.test_action(conn, SMFIF_CHGBODY) or mt.test_action(conn, SMFIF_ADDHDRS) then
    error("an action we never use was negotiated")
end
if not mt.test_option(conn, SMFIP_NOBODY) or not mt.test_option(conn, SMFIP_NOHDRS) then
    error("the body and headers should be switched off")
end

mt.macro(conn, SMFIC_CONNECT, "j", "mx.example.org", "{daemon_name}", "mx")
if mt.conninfo(conn, "client.example.net", "192.0.2.1") ~= nil then error("conninfo failed") end

-- A forged bounce: refused at RCPT with 550 5.7.1 and the policy's text.
if mt.mailfrom(conn, "<>") ~= nil then error("mailfrom failed") end
if mt.rcptto(conn, "<user@example.org>") ~= nil then error("rcptto failed") end
if mt.getreply(conn) ~= SMFIR_REPLYCODE then error("the forged bounce was not refused") end
mt.abort(conn)

-- A genuine bounce to a tagged address: accepted, and delivered to the address without its tag.
if mt.mailfrom(conn, "<>") ~= nil then error("mailfrom failed") end
if mt.rcptto(conn, "<" .. tagged .. ">") ~= nil then error("rcptto failed") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error("the genuine bounce was refused") end
if mt.eom(conn) ~= nil then error("eom failed") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error("end of message was not continue") end
if not mt.eom_check(conn, MT_RCPTDELETE, "<" .. tagged .. ">") then error("the tagged recipient was not deleted") end
if not mt.eom_check(conn, MT_RCPTADD, "<user@example.org>") then error("the bare recipient was not added") end

mt.disconnect(conn)
mt.echo("ok")

-- Wireshark dissector for the Serval Service Access Layer (SAL) carried in UDP.
--
-- Shipped with pyserval (`pyserval dissector` prints this file's path). Load it with
--   tshark -X lua_script:/path/to/sal.lua -r capture.pcap
-- or copy it into Wireshark's personal plugins folder.
--
-- What it decodes: the 12-byte base header (flowIDs, header length, transport protocol,
-- header checksum, verified), every extension of the reference format (PAD, CONTROL,
-- SERVICE, ADDRESS, SOURCE) and pyserval's own (5 SOURCE_PORTS, 6 MP_CAPABLE, 7 DSS,
-- 8 JOIN, 9 ADD_ADDR; see README "Wire format notes"). A type it does not know is shown as
-- "extension type N" with its raw bytes, so newer extensions never stop the decoding. The
-- transport after the header goes to Wireshark's own TCP (6) or UDP (17) dissector.
--
-- Where: UDP ports 54324 and 54325 (the reference ports), and heuristically on any other
-- UDP port (a payload whose header length, protocol and header checksum all make sense).
--
-- What it does not do: raw IP protocol 144 captures are registered too, but untested;
-- flows are not followed across packets (the TCP dissector tracks nothing useful with
-- ports 0, so its analysis is left as Wireshark does it).

local sal = Proto("sal", "Serval Service Access Layer")

local PROTOCOLS = { [6] = "TCP", [17] = "UDP" }
local EXT_NAMES = {
    [0] = "PAD", [1] = "CONTROL", [2] = "SERVICE", [3] = "ADDRESS", [4] = "SOURCE",
    [5] = "SOURCE_PORTS", [6] = "MP_CAPABLE", [7] = "DSS", [8] = "JOIN", [9] = "ADD_ADDR",
}

local f = {
    src_flowid = ProtoField.uint32("sal.src_flowid", "Source flowID", base.HEX),
    dst_flowid = ProtoField.uint32("sal.dst_flowid", "Destination flowID", base.HEX),
    shl = ProtoField.uint8("sal.shl", "Header length (32-bit words)", base.DEC),
    hlen = ProtoField.uint16("sal.hlen", "Header length (bytes)", base.DEC),
    protocol = ProtoField.uint8("sal.protocol", "Transport protocol", base.DEC, PROTOCOLS),
    checksum = ProtoField.uint16("sal.checksum", "Header checksum", base.HEX),
    checksum_status = ProtoField.string("sal.checksum.status", "Header checksum status"),

    ext = ProtoField.bytes("sal.ext", "Extension"),
    ext_type = ProtoField.uint8("sal.ext.type", "Extension type", base.DEC, EXT_NAMES, 0xF0),
    ext_reserved_nibble = ProtoField.uint8("sal.ext.reserved_bits", "Reserved bits", base.HEX, nil, 0x0F),
    ext_length = ProtoField.uint8("sal.ext.length", "Extension length", base.DEC),
    ext_reserved = ProtoField.uint16("sal.ext.reserved", "Reserved", base.HEX),
    ext_data = ProtoField.bytes("sal.ext.data", "Extension data"),
    ext_count = ProtoField.uint8("sal.ext_count", "Extensions", base.DEC),

    ctl_flags = ProtoField.uint8("sal.ctl.flags", "Control flags", base.HEX),
    ctl_syn = ProtoField.bool("sal.ctl.flags.syn", "SYN", 8, nil, 0x80),
    ctl_rsyn = ProtoField.bool("sal.ctl.flags.rsyn", "RSYN", 8, nil, 0x40),
    ctl_ack = ProtoField.bool("sal.ctl.flags.ack", "ACK", 8, nil, 0x20),
    ctl_nack = ProtoField.bool("sal.ctl.flags.nack", "NACK", 8, nil, 0x10),
    ctl_rst = ProtoField.bool("sal.ctl.flags.rst", "RST", 8, nil, 0x08),
    ctl_fin = ProtoField.bool("sal.ctl.flags.fin", "FIN", 8, nil, 0x04),
    ctl_challenge = ProtoField.bool("sal.ctl.flags.challenge", "CHALLENGE (pyserval)", 8, nil, 0x02),
    ctl_reserved = ProtoField.uint8("sal.ctl.reserved", "Reserved", base.HEX),
    ctl_verno = ProtoField.uint32("sal.ctl.verno", "Verno", base.HEX),
    ctl_ackno = ProtoField.uint32("sal.ctl.ackno", "Ackno", base.HEX),
    ctl_nonce = ProtoField.bytes("sal.ctl.nonce", "Nonce"),

    svc_id = ProtoField.bytes("sal.svc.id", "ServiceID"),

    addr_verno = ProtoField.uint32("sal.addr.verno", "Verno", base.HEX),
    addr_ackno = ProtoField.uint32("sal.addr.ackno", "Ackno", base.HEX),
    addr_ip = ProtoField.ipv4("sal.addr.ip", "Address"),

    src_ip = ProtoField.ipv4("sal.source.ip", "Path address"),

    srcports_count = ProtoField.uint8("sal.source_ports.count", "Port count", base.DEC),
    srcports_port = ProtoField.uint16("sal.source_ports.port", "Port", base.DEC),

    mpc_key = ProtoField.uint64("sal.mp_capable.key", "Key", base.HEX),

    dss_flags = ProtoField.uint8("sal.dss.flags", "DSS flags", base.HEX),
    dss_has_dsn = ProtoField.bool("sal.dss.flags.dsn", "DSN valid", 8, nil, 0x01),
    dss_data_fin = ProtoField.bool("sal.dss.flags.data_fin", "DATA_FIN", 8, nil, 0x02),
    dss_dsn = ProtoField.uint64("sal.dss.dsn", "Data sequence number", base.DEC),
    dss_data_ack = ProtoField.uint64("sal.dss.data_ack", "Data ACK", base.DEC),

    join_token = ProtoField.uint32("sal.join.token", "Token", base.HEX),
    join_proof = ProtoField.bytes("sal.join.proof", "Proof"),

    addaddr_port = ProtoField.uint16("sal.add_addr.port", "UDP port", base.DEC),
    addaddr_ip = ProtoField.ipv4("sal.add_addr.ip", "Address"),
}
sal.fields = {}
for _, field in pairs(f) do
    table.insert(sal.fields, field)
end

local ef_malformed = ProtoExpert.new("sal.malformed", "Malformed SAL header",
    expert.group.MALFORMED, expert.severity.ERROR)
local ef_checksum = ProtoExpert.new("sal.checksum.bad", "Bad SAL header checksum",
    expert.group.CHECKSUM, expert.severity.WARN)
local ef_transport = ProtoExpert.new("sal.transport.malformed", "Malformed transport",
    expert.group.MALFORMED, expert.severity.ERROR)
sal.experts = { ef_malformed, ef_checksum, ef_transport }

local tcp_dissector = Dissector.get("tcp")
local udp_dissector = Dissector.get("udp")

-- Ones'-complement sum over the header's 16-bit words (the check field included):
-- 0xFFFF when the checksum is right.
local function header_sum(buf, hlen)
    local sum = 0
    for i = 0, hlen - 2, 2 do
        sum = sum + buf(i, 2):uint()
    end
    while sum > 0xFFFF do
        sum = bit32.band(sum, 0xFFFF) + bit32.rshift(sum, 16)
    end
    return sum
end

local function flag_names(flags)
    local names = {}
    local bits = { { "SYN", 0x80 }, { "RSYN", 0x40 }, { "ACK", 0x20 }, { "NACK", 0x10 },
        { "RST", 0x08 }, { "FIN", 0x04 }, { "CHALLENGE", 0x02 } }
    for _, b in ipairs(bits) do
        if bit32.band(flags, b[2]) ~= 0 then
            table.insert(names, b[1])
        end
    end
    if #names == 0 then
        return "-"
    end
    return table.concat(names, "+")
end

-- One decoder per extension type: (extension buffer, its subtree, summary list).
local decoders = {}

decoders[1] = function(ext, t, summary)
    if ext:len() ~= 20 then
        return false
    end
    local flags = ext(2, 1):uint()
    local ft = t:add(f.ctl_flags, ext(2, 1))
    ft:append_text(" (" .. flag_names(flags) .. ")")
    for _, fl in ipairs({ f.ctl_syn, f.ctl_rsyn, f.ctl_ack, f.ctl_nack, f.ctl_rst, f.ctl_fin,
        f.ctl_challenge }) do
        ft:add(fl, ext(2, 1))
    end
    t:add(f.ctl_reserved, ext(3, 1))
    t:add(f.ctl_verno, ext(4, 4))
    t:add(f.ctl_ackno, ext(8, 4))
    t:add(f.ctl_nonce, ext(12, 8))
    t:append_text(string.format(": %s verno=0x%08x ackno=0x%08x", flag_names(flags),
        ext(4, 4):uint(), ext(8, 4):uint()))
    table.insert(summary, "CTL[" .. flag_names(flags) .. "]")
    return true
end

decoders[2] = function(ext, t, summary)
    if ext:len() ~= 36 then
        return false
    end
    t:add(f.ext_reserved, ext(2, 2))
    t:add(f.svc_id, ext(4, 32))
    local hex = tostring(ext(4, 32):bytes())
    t:append_text(": " .. hex)
    table.insert(summary, "SVC[" .. string.sub(hex, 1, 8) .. "...]")
    return true
end

decoders[3] = function(ext, t, summary)
    local n = ext:len()
    if n < 12 or (n - 12) % 4 ~= 0 then
        return false
    end
    t:add(f.ext_reserved, ext(2, 2))
    t:add(f.addr_verno, ext(4, 4))
    t:add(f.addr_ackno, ext(8, 4))
    for off = 12, n - 4, 4 do
        t:add(f.addr_ip, ext(off, 4))
    end
    table.insert(summary, "ADDR")
    return true
end

decoders[4] = function(ext, t, summary)
    local n = ext:len()
    local count = math.floor((n - 4) / 4)
    if n < 4 or (n - 4) % 4 ~= 0 or count < 2 or count > 20 then
        return false
    end
    t:add(f.ext_reserved, ext(2, 2))
    local path = {}
    for off = 4, n - 4, 4 do
        t:add(f.src_ip, ext(off, 4))
        table.insert(path, tostring(ext(off, 4):ipv4()))
    end
    t:append_text(": " .. table.concat(path, " > "))
    table.insert(summary, "SRC[" .. count .. "]")
    return true
end

decoders[5] = function(ext, t, summary)
    local n = ext:len()
    if n < 4 then
        return false
    end
    local count = ext(2, 1):uint()
    if count < 2 or count > 20 or n ~= 4 + math.floor((2 * count + 3) / 4) * 4 then
        return false
    end
    t:add(f.srcports_count, ext(2, 1))
    t:add(f.ctl_reserved, ext(3, 1))
    local ports = {}
    for i = 0, count - 1 do
        t:add(f.srcports_port, ext(4 + 2 * i, 2))
        table.insert(ports, tostring(ext(4 + 2 * i, 2):uint()))
    end
    t:append_text(": " .. table.concat(ports, ", "))
    table.insert(summary, "PORTS")
    return true
end

decoders[6] = function(ext, t, summary)
    if ext:len() ~= 12 then
        return false
    end
    t:add(f.ext_reserved, ext(2, 2))
    t:add(f.mpc_key, ext(4, 8))
    table.insert(summary, "MP_CAPABLE")
    return true
end

decoders[7] = function(ext, t, summary)
    if ext:len() ~= 20 then
        return false
    end
    local ft = t:add(f.dss_flags, ext(2, 1))
    ft:add(f.dss_has_dsn, ext(2, 1))
    ft:add(f.dss_data_fin, ext(2, 1))
    t:add(f.ctl_reserved, ext(3, 1))
    t:add(f.dss_dsn, ext(4, 8))
    t:add(f.dss_data_ack, ext(12, 8))
    table.insert(summary, "DSS")
    return true
end

decoders[8] = function(ext, t, summary)
    if ext:len() ~= 16 then
        return false
    end
    t:add(f.ext_reserved, ext(2, 2))
    t:add(f.join_token, ext(4, 4))
    t:add(f.join_proof, ext(8, 8))
    table.insert(summary, "JOIN")
    return true
end

decoders[9] = function(ext, t, summary)
    if ext:len() ~= 8 then
        return false
    end
    t:add(f.addaddr_port, ext(2, 2))
    t:add(f.addaddr_ip, ext(4, 4))
    t:append_text(string.format(": %s:%d", tostring(ext(4, 4):ipv4()), ext(2, 2):uint()))
    table.insert(summary, "ADD_ADDR")
    return true
end

-- Does this look like a SAL header? Used by the heuristic (and nothing else).
local function plausible(buf)
    local len = buf:len()
    if len < 12 then
        return false
    end
    local shl = buf(8, 1):uint()
    local proto = buf(9, 1):uint()
    if shl < 3 or shl * 4 > len or (proto ~= 6 and proto ~= 17) then
        return false
    end
    return header_sum(buf, shl * 4) == 0xFFFF
end

local function dissect(buf, pinfo, root)
    local len = buf:len()
    if len < 12 then
        return 0
    end
    pinfo.cols.protocol:set("SAL")
    local shl = buf(8, 1):uint()
    local hlen = shl * 4
    local proto = buf(9, 1):uint()
    local tree = root:add(sal, buf(0, math.min(math.max(hlen, 12), len)))
    tree:add(f.src_flowid, buf(0, 4))
    tree:add(f.dst_flowid, buf(4, 4))
    tree:add(f.shl, buf(8, 1))
    tree:add(f.hlen, buf(8, 1), hlen):set_generated()
    tree:add(f.protocol, buf(9, 1))
    local ck = tree:add(f.checksum, buf(10, 2))
    if hlen < 12 or hlen > len then
        tree:add_proto_expert_info(ef_malformed, "header length " .. hlen .. " bytes")
        return len
    end
    if header_sum(buf, hlen) == 0xFFFF then
        ck:add(f.checksum_status, "good"):set_generated()
    else
        ck:add(f.checksum_status, "bad"):set_generated()
        ck:add_proto_expert_info(ef_checksum)
    end

    local summary = {}
    local off = 12
    local count = 0
    while off < hlen do
        local head = buf(off, 1):uint()
        local etype = bit32.rshift(head, 4)
        if etype == 0 then
            local pt = tree:add(f.ext, buf(off, 1))
            pt:set_text("PAD")
            pt:add(f.ext_type, buf(off, 1))
            off = off + 1
        else
            if off + 2 > hlen then
                tree:add_proto_expert_info(ef_malformed, "truncated extension head")
                break
            end
            local elen = buf(off + 1, 1):uint()
            if elen < 2 or off + elen > hlen then
                tree:add_proto_expert_info(ef_malformed,
                    "extension length " .. elen .. " past the header")
                break
            end
            local ext = buf(off, elen)
            local et = tree:add(f.ext, ext)
            et:set_text(EXT_NAMES[etype] or ("extension type " .. etype))
            et:add(f.ext_type, ext(0, 1))
            local rt = et:add(f.ext_reserved_nibble, ext(0, 1))
            if bit32.band(head, 0x0F) ~= 0 then
                rt:add_proto_expert_info(ef_malformed, "reserved bits set in an extension head")
            end
            et:add(f.ext_length, ext(1, 1))
            local decoder = decoders[etype]
            if decoder == nil then
                if elen > 2 then
                    et:add(f.ext_data, ext(2, elen - 2))
                end
                table.insert(summary, "EXT" .. etype)
            elseif not decoder(ext, et, summary) then
                et:add_proto_expert_info(ef_malformed,
                    (EXT_NAMES[etype] or "extension") .. " of " .. elen .. " bytes")
                if elen > 2 then
                    et:add(f.ext_data, ext(2, elen - 2))
                end
            end
            count = count + 1
            off = off + elen
        end
    end
    local ct = tree:add(f.ext_count, count)
    ct:set_generated()
    if count > 10 then
        ct:add_proto_expert_info(ef_malformed, "more than 10 extensions")
    end
    tree:append_text(string.format(", flowIDs 0x%08x -> 0x%08x", buf(0, 4):uint(),
        buf(4, 4):uint()))

    local label = string.format("SAL %08x>%08x", buf(0, 4):uint(), buf(4, 4):uint())
    if #summary > 0 then
        label = label .. " " .. table.concat(summary, " ")
    end
    local transport = PROTOCOLS[proto]
    if hlen < len and transport ~= nil then
        -- Wireshark's own dissector for the transport; its ports are 0 (flows are told
        -- apart by flowID), so its per-conversation analysis mixes flows between the
        -- same two addresses.
        local inner = buf(hlen):tvb()
        local transport_dissector = (proto == 6) and tcp_dissector or udp_dissector
        -- A damaged transport header makes Wireshark's dissector throw; caught here, so it
        -- is reported as malformed transport rather than as an error of this script.
        local ok, err = pcall(Dissector.call, transport_dissector, inner, pinfo, root)
        if not ok then
            tree:add_proto_expert_info(ef_transport, transport .. " after the SAL header: "
                .. tostring(err))
        end
        pinfo.cols.protocol:set("SAL/" .. transport)
        pinfo.cols.info:prepend(label .. " | ")
    else
        pinfo.cols.protocol:set("SAL")
        pinfo.cols.info:set(label)
    end
    return len
end

function sal.dissector(buf, pinfo, root)
    return dissect(buf, pinfo, root)
end

local function heuristic(buf, pinfo, root)
    if not plausible(buf) then
        return false
    end
    dissect(buf, pinfo, root)
    return true
end

local udp_port = DissectorTable.get("udp.port")
udp_port:add(54324, sal)
udp_port:add(54325, sal)
sal:register_heuristic("udp", heuristic)
DissectorTable.get("ip.proto"):add(144, sal)

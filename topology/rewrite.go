// Package topology rewrites the node addresses in Redis Cluster replies, so that a cluster-aware
// client behind the proxy dials the proxy's local listener for each node instead of the node
// itself: CLUSTER SLOTS, CLUSTER SHARDS, CLUSTER NODES and CLUSTER REPLICAS (RESP2 and RESP3),
// -MOVED / -ASK redirects, and a single endpoint (Endpoint). It holds no state and knows nothing of the network: the caller
// buffers one whole reply (at most MaxReply bytes) and says, through a Map, which local address
// stands for which node.
//
// The rewriting is exact: only the address fields change; every other byte, the framing and the
// element counts stay as the server sent them, and each changed string gets its new length.
package topology

import (
	"bytes"
	"errors"
	"net"
	"slices"
	"strconv"
	"strings"
)

// MaxReply bounds a topology reply held whole for rewriting. A cluster's replies are small
// (CLUSTER SLOTS of 100 nodes: about 20 KB); the worst case, every one of the 16384 slots in
// its own range with a primary and two replicas, is about 4 MB.
const MaxReply = 8 << 20

var (
	// ErrTooLarge: the reply is longer than MaxReply.
	ErrTooLarge = errors.New("topology reply larger than 8 MiB")
	// ErrMalformed: the input is not one complete RESP value of the expected shape.
	ErrMalformed = errors.New("malformed topology reply")
)

// Map tells where a node's local listener is.
type Map struct {
	// Connected is the host the upstream connection reached: what a node address with an empty
	// host ("MOVED 1 :6380", unknown-endpoint) or "?" means.
	Connected string
	// Local returns the local listener's host:port for a node's upstream host:port, as the
	// cluster names it (net.JoinHostPort), or false when the node has no listener yet.
	Local func(upstream string) (local string, ok bool)
}

// Result is a rewritten reply.
type Result struct {
	// Out is the reply to send: the input with every known address replaced. It is the input
	// itself (not a copy) when nothing changed.
	Out []byte
	// Unknown lists, once each, the upstream addresses Local did not know; they are left as
	// they were. The caller refreshes its topology and rewrites again.
	Unknown []string
}

// edit replaces in[start:end] with repl.
type edit struct {
	start, end int
	repl       []byte
}

// rewriter collects the edits of one reply.
type rewriter struct {
	m       Map
	in      []byte
	edits   []edit
	unknown []string
}

// local resolves an upstream host and port; an empty or "?" host is the connected one.
func (r *rewriter) local(host string, port int64) (lhost string, lport int64, ok bool) {
	up := net.JoinHostPort(resolveHost(host, r.m.Connected), strconv.FormatInt(port, 10))
	l, ok := r.m.Local(up)
	if ok {
		h, p, err := net.SplitHostPort(l)
		n, perr := strconv.ParseInt(p, 10, 64)
		if err == nil && perr == nil {
			return h, n, true
		}
	}
	if !slices.Contains(r.unknown, up) {
		r.unknown = append(r.unknown, up)
	}
	return "", 0, false
}

// setString replaces a string value's text, keeping its type (simple or bulk).
func (r *rewriter) setString(v value, s string) {
	var b []byte
	if v.typ == '+' {
		b = append(append(append(b, '+'), s...), "\r\n"...)
	} else {
		b = appendBulk(b, '$', s)
	}
	r.edits = append(r.edits, edit{v.start, v.end, b})
}

func (r *rewriter) setInt(v value, n int64) {
	b := strconv.AppendInt([]byte{':'}, n, 10)
	r.edits = append(r.edits, edit{v.start, v.end, append(b, "\r\n"...)})
}

func appendBulk(b []byte, typ byte, s string) []byte {
	b = strconv.AppendInt(append(b, typ), int64(len(s)), 10)
	b = append(append(b, "\r\n"...), s...)
	return append(b, "\r\n"...)
}

// result applies the edits, which were collected in input order and do not overlap.
func (r *rewriter) result() Result {
	if len(r.edits) == 0 {
		return Result{Out: r.in, Unknown: r.unknown}
	}
	var out []byte
	last := 0
	for _, e := range r.edits {
		out = append(append(out, r.in[last:e.start]...), e.repl...)
		last = e.end
	}
	return Result{Out: append(out, r.in[last:]...), Unknown: r.unknown}
}

// start parses in; an error reply (a refused command) passes unchanged.
func start(m Map, in []byte) (*rewriter, value, bool, error) {
	v, err := parse(in)
	if err != nil {
		return nil, value{}, false, err
	}
	return &rewriter{m: m, in: in}, v, v.typ != '-' && v.typ != '!', nil
}

// Slots rewrites a CLUSTER SLOTS reply: each node's endpoint and port, and the "ip" and
// "hostname" of its metadata (Redis 7).
func Slots(m Map, in []byte) (Result, error) {
	r, v, ok, err := start(m, in)
	if err != nil || !ok {
		return Result{Out: in}, err
	}
	if v.typ != '*' {
		return Result{}, errors.Join(ErrMalformed, errors.New("CLUSTER SLOTS: not an array"))
	}
	for _, rng := range v.kids {
		if rng.typ != '*' || len(rng.kids) < 2 {
			return Result{}, errors.Join(ErrMalformed, errors.New("CLUSTER SLOTS: a range is not [first, last, nodes...]"))
		}
		for _, node := range rng.kids[2:] {
			if err := r.slotsNode(node); err != nil {
				return Result{}, err
			}
		}
	}
	return r.result(), nil
}

// resolveHost returns the host a node address names: an empty or "?" host (a null one, or
// cluster-preferred-endpoint-type unknown-endpoint) is the one the connection reached.
func resolveHost(host, connected string) string {
	if host == "" || host == "?" {
		return connected
	}
	return host
}

// slotsEndpoint reads the host and port of a CLUSTER SLOTS node [host, port, ...]; a null host
// is empty.
func slotsEndpoint(node value) (string, int64, error) {
	if node.typ != '*' || len(node.kids) < 2 {
		return "", 0, errors.Join(ErrMalformed, errors.New("CLUSTER SLOTS: a node is not [host, port, ...]"))
	}
	host, hok := node.kids[0].str()
	port, pok := node.kids[1].num()
	if !pok || !hok && node.kids[0].typ != '_' && node.kids[0].typ != '$' {
		return "", 0, errors.Join(ErrMalformed, errors.New("CLUSTER SLOTS: a node's host or port has the wrong type"))
	}
	return host, port, nil
}

func (r *rewriter) slotsNode(node value) error {
	host, port, err := slotsEndpoint(node)
	if err != nil {
		return err
	}
	lhost, lport, ok := r.local(host, port)
	if !ok {
		return nil
	}
	r.setString(node.kids[0], lhost)
	r.setInt(node.kids[1], lport)
	if len(node.kids) < 4 {
		return nil
	}
	meta, ok := node.kids[3].pairs()
	if !ok {
		return nil // not metadata this version knows
	}
	for i := 0; i < len(meta); i += 2 {
		if k, _ := meta[i].str(); (k == "ip" || k == "hostname") && meta[i+1].text != nil {
			r.setString(meta[i+1], lhost)
		}
	}
	return nil
}

// Shards rewrites a CLUSTER SHARDS reply (Redis 7): each node's "ip", "endpoint" and "hostname"
// become the local host, "port" the local port. A node with only "tls-port" (a TLS-only cache)
// gets "port" in its place, since the local listener speaks plain RESP; next to "port" it gets
// the local port too.
func Shards(m Map, in []byte) (Result, error) {
	r, v, ok, err := start(m, in)
	if err != nil || !ok {
		return Result{Out: in}, err
	}
	if v.typ != '*' {
		return Result{}, errors.Join(ErrMalformed, errors.New("CLUSTER SHARDS: not an array"))
	}
	for _, shard := range v.kids {
		kv, ok := shard.pairs()
		if !ok {
			return Result{}, errors.Join(ErrMalformed, errors.New("CLUSTER SHARDS: a shard is not a map"))
		}
		for i := 0; i < len(kv); i += 2 {
			if k, _ := kv[i].str(); k != "nodes" {
				continue
			}
			if kv[i+1].typ != '*' {
				return Result{}, errors.Join(ErrMalformed, errors.New("CLUSTER SHARDS: nodes is not an array"))
			}
			for _, node := range kv[i+1].kids {
				if err := r.shardsNode(node); err != nil {
					return Result{}, err
				}
			}
		}
	}
	return r.result(), nil
}

func (r *rewriter) shardsNode(node value) error {
	kv, ok := node.pairs()
	if !ok {
		return errors.Join(ErrMalformed, errors.New("CLUSTER SHARDS: a node is not a map"))
	}
	field := func(name string) (value, value, bool) {
		for i := 0; i < len(kv); i += 2 {
			if k, _ := kv[i].str(); k == name {
				return kv[i], kv[i+1], true
			}
		}
		return value{}, value{}, false
	}
	host := ""
	for _, name := range []string{"endpoint", "ip"} {
		if _, v, ok := field(name); ok {
			if s, _ := v.str(); s != "" && s != "?" {
				host = s
				break
			}
		}
	}
	_, portV, hasPort := field("port")
	tlsK, tlsV, hasTLS := field("tls-port")
	upPort := portV
	if hasTLS { // the proxy reaches nodes over TLS
		upPort = tlsV
	}
	port, ok := upPort.num()
	if !hasPort && !hasTLS || !ok {
		return errors.Join(ErrMalformed, errors.New("CLUSTER SHARDS: a node without a port"))
	}
	lhost, lport, ok := r.local(host, port)
	if !ok {
		return nil
	}
	// Edits must stay in input order: walk the pairs once.
	for i := 0; i < len(kv); i += 2 {
		k, _ := kv[i].str()
		v := kv[i+1]
		switch {
		case k == "ip" || k == "endpoint" || k == "hostname":
			if s, _ := v.str(); s != "" {
				r.setString(v, lhost)
			}
		case k == "port":
			r.setInt(v, lport)
		case k == "tls-port" && hasPort:
			r.setInt(v, lport)
		case k == "tls-port":
			r.setString(tlsK, "port")
			r.setInt(v, lport)
		}
	}
	return nil
}

// Nodes rewrites a CLUSTER NODES reply (a bulk string, or RESP3's verbatim "txt:" string) or a
// CLUSTER REPLICAS reply (an array of such lines): in each line the address field
// "host:port@busport[,hostname]" becomes "localhost:localport@busport[,localhost]".
func Nodes(m Map, in []byte) (Result, error) {
	r, v, ok, err := start(m, in)
	if err != nil || !ok {
		return Result{Out: in}, err
	}
	switch v.typ {
	case '$', '=':
		r.nodesText(v)
	case '*':
		for _, k := range v.kids {
			if k.typ != '$' && k.typ != '=' {
				return Result{}, errors.Join(ErrMalformed, errors.New("CLUSTER REPLICAS: an element is not a string"))
			}
			r.nodesText(k)
		}
	default:
		return Result{}, errors.Join(ErrMalformed, errors.New("CLUSTER NODES: not a string"))
	}
	return r.result(), nil
}

// nodesText rewrites one string of CLUSTER NODES lines; its length is recomputed.
func (r *rewriter) nodesText(v value) {
	if v.text == nil {
		return
	}
	text, prefix := v.text, ""
	if v.typ == '=' && len(text) >= 4 && text[3] == ':' { // verbatim: 3-letter format and ':'
		prefix, text = string(text[:4]), text[4:]
	}
	var out strings.Builder
	changed := false
	for line := range strings.SplitAfterSeq(string(text), "\n") {
		line, eol := strings.CutSuffix(line, "\n") // kept when the address is the line's last field
		nl, ok := r.nodesLine(line)
		changed = changed || ok
		out.WriteString(nl)
		if eol {
			out.WriteByte('\n')
		}
	}
	if changed {
		r.edits = append(r.edits, edit{v.start, v.end, appendBulk(nil, v.typ, prefix+out.String())})
	}
}

// nodesLine rewrites the address (second field) of one line, without its newline.
func (r *rewriter) nodesLine(line string) (string, bool) {
	id, rest, ok := strings.Cut(line, " ")
	if !ok {
		return line, false
	}
	addr, tail, _ := strings.Cut(rest, " ")
	hostport, bus, hasBus := strings.Cut(addr, "@")
	i := strings.LastIndexByte(hostport, ':')
	if i < 0 {
		return line, false
	}
	port, err := strconv.ParseInt(hostport[i+1:], 10, 64)
	if err != nil {
		return line, false
	}
	lhost, lport, ok := r.local(hostport[:i], port)
	if !ok {
		return line, false
	}
	naddr := redisAddr(lhost, lport)
	if hasBus {
		busPort, hostname, hasName := strings.Cut(bus, ",")
		naddr += "@" + busPort
		if hasName && hostname != "" {
			naddr += "," + lhost
		} else if hasName {
			naddr += ","
		}
	}
	s := id + " " + naddr
	if len(rest) > len(addr) {
		s += " " + tail
	}
	return s, true
}

// redisAddr formats an address as Redis does in CLUSTER NODES and redirects: host:port, an
// IPv6 host without brackets.
func redisAddr(host string, port int64) string {
	return host + ":" + strconv.FormatInt(port, 10)
}

// Redirect rewrites a "-MOVED <slot> <host>:<port>" or "-ASK ..." error frame (with its CRLF);
// an empty host means the connected one. changed is false for any other frame, which is
// returned as is, and for a redirect to a node Local does not know: unknown names it.
func Redirect(m Map, frame []byte) (out []byte, unknown string, changed bool) {
	line, ok := bytes.CutSuffix(frame, []byte("\r\n"))
	if !ok || !bytes.HasPrefix(line, []byte("-MOVED ")) && !bytes.HasPrefix(line, []byte("-ASK ")) {
		return frame, "", false
	}
	f := strings.Split(string(line), " ")
	if len(f) != 3 || strings.ContainsAny(f[2], "\r\n") {
		return frame, "", false
	}
	local, unknown, ok := Endpoint(m, f[2])
	if !ok {
		return frame, unknown, false
	}
	out = append(append(append([]byte(nil), f[0]...), ' '), f[1]...)
	out = append(append(out, ' '), local...)
	return append(out, "\r\n"...), "", true
}

// Endpoint rewrites one node endpoint "host:port" as redis writes it in a redirect (Redirect is its
// caller; Redis Enterprise's MOVING and SMIGRATING/SMIGRATED pushes carry the same form, but the proxy
// never lets an app turn those on): an empty host means the connected one, an IPv6 host has no brackets. It returns the node's local
// listener in the same form, or ok false: when endpoint is not host:port, and when Local does not
// know the node, which unknown then names (net.JoinHostPort) for a topology refresh.
func Endpoint(m Map, endpoint string) (local, unknown string, ok bool) {
	i := strings.LastIndexByte(endpoint, ':')
	if i < 0 {
		return "", "", false
	}
	port, err := strconv.ParseInt(endpoint[i+1:], 10, 64)
	if err != nil {
		return "", "", false
	}
	r := &rewriter{m: m}
	lhost, lport, ok := r.local(endpoint[:i], port)
	if !ok {
		return "", r.unknown[0], false
	}
	return redisAddr(lhost, lport), "", true
}

package proxy

// CommandNames are the command names reported to the Observer under their own name;
// every other command is reported as "other", so metric label sets stay bounded.
var CommandNames = []string{
	"append", "auth", "bitcount", "blmove", "blmpop", "blpop", "brpop", "brpoplpush", "bzmpop", "bzpopmax",
	"bzpopmin", "client", "command", "config", "dbsize", "decr", "decrby", "del", "discard", "echo", "eval",
	"evalsha", "exec", "exists", "expire", "expireat", "get", "getdel", "getex", "getrange", "getset",
	"hdel", "hello", "hexists", "hget", "hgetall", "hincrby", "hkeys", "hlen", "hmget", "hmset", "hscan",
	"hset", "hsetnx", "hvals", "incr", "incrby", "incrbyfloat", "info", "keys", "lindex", "linsert",
	"llen", "lmove", "lpop", "lpos", "lpush", "lrange", "lrem", "lset", "ltrim", "mget", "monitor", "mset",
	"msetnx", "multi", "persist", "pexpire", "pfadd", "pfcount", "ping", "psetex", "psubscribe",
	"pttl", "publish", "punsubscribe", "quit", "reset", "rpop", "rpush", "sadd", "scan", "scard", "script",
	"select", "set", "setex", "setnx", "sismember", "smembers", "spop", "srem", "sscan", "ssubscribe",
	"strlen", "subscribe", "sunsubscribe", "ttl", "type", "unlink", "unsubscribe", "unwatch", "wait",
	"watch", "xack", "xadd", "xlen", "xrange", "xread", "xreadgroup", "zadd", "zcard", "zincrby",
	"zrange", "zrangebyscore", "zrank", "zrem", "zrevrange", "zscore",
}

// special marks the commands whose handling differs from plain forwarding.
type special uint8

const (
	spNone special = iota
	spAuth
	spHello
	spReset
	spQuit
	spMulti
	spExec    // EXEC: the transaction runs
	spDiscard // DISCARD: the transaction ends without running
	spClient  // CLIENT REPLY changes which commands get replies
	spSub     // SUBSCRIBE, PSUBSCRIBE, SSUBSCRIBE
	spUnsub   // UNSUBSCRIBE, PUNSUBSCRIBE, SUNSUBSCRIBE
	spMonitor // MONITOR
	spBlock   // a command that may block: BLPOP, XREAD BLOCK, WAIT... (timeout at blockArg)
	spWatch   // WATCH
	spUnwatch // UNWATCH
	spSelect  // SELECT: the database, which a handover carries
	spRefused // SYNC, PSYNC, REPLCONF: answered by the proxy with an error
	spState   // other commands that change the connection's state: READONLY, ASKING...
	spCount   // the number of kinds
)

// family is a pub/sub family: the three kinds of subscription redis keeps apart.
type family uint8

const (
	famChannel family = iota
	famPattern
	famShard
)

// cmdOther is the metrics index of a command not in CommandNames.
const cmdOther = 255

type cmdInfo struct {
	idx uint8 // index into CommandNames
	sp  special
	fam family
	// For spBlock: where the timeout is. >0: that argument; -1: the last one; 0: after a BLOCK option.
	blockArg int8
	blockMS  bool // the timeout is in milliseconds, not seconds
}

// commandTable maps lower-case command names to what the proxy knows of them.
var commandTable = func() map[string]cmdInfo {
	if len(CommandNames) >= cmdOther {
		panic("proxy: too many CommandNames")
	}
	sp := map[string]cmdInfo{
		"auth": {sp: spAuth}, "hello": {sp: spHello}, "reset": {sp: spReset}, "quit": {sp: spQuit},
		"multi": {sp: spMulti}, "exec": {sp: spExec}, "discard": {sp: spDiscard}, "client": {sp: spClient},
		"subscribe": {sp: spSub, fam: famChannel}, "psubscribe": {sp: spSub, fam: famPattern},
		"ssubscribe": {sp: spSub, fam: famShard}, "unsubscribe": {sp: spUnsub, fam: famChannel},
		"punsubscribe": {sp: spUnsub, fam: famPattern}, "sunsubscribe": {sp: spUnsub, fam: famShard},
		"monitor": {sp: spMonitor}, "watch": {sp: spWatch}, "unwatch": {sp: spUnwatch},
		"blpop": {sp: spBlock, blockArg: -1}, "brpop": {sp: spBlock, blockArg: -1},
		"brpoplpush": {sp: spBlock, blockArg: -1}, "blmove": {sp: spBlock, blockArg: -1},
		"bzpopmin": {sp: spBlock, blockArg: -1}, "bzpopmax": {sp: spBlock, blockArg: -1},
		"blmpop": {sp: spBlock, blockArg: 1}, "bzmpop": {sp: spBlock, blockArg: 1},
		"xread": {sp: spBlock, blockMS: true}, "xreadgroup": {sp: spBlock, blockMS: true},
		"wait":   {sp: spBlock, blockArg: -1, blockMS: true},
		"select": {sp: spSelect}, "readonly": {sp: spState}, "readwrite": {sp: spState},
		"asking": {sp: spState}, "swapdb": {sp: spState},
		"sync": {sp: spRefused}, "psync": {sp: spRefused}, "replconf": {sp: spRefused},
	}
	t := make(map[string]cmdInfo, len(CommandNames)+len(sp))
	for name, info := range sp {
		info.idx = cmdOther
		t[name] = info
	}
	for i, name := range CommandNames {
		info := t[name]
		info.idx = uint8(i)
		t[name] = info
	}
	return t
}()

// lookup classifies a command by name, case-insensitively, without allocating.
func lookup(name []byte) cmdInfo {
	var b [20]byte
	if len(name) > len(b) {
		return cmdInfo{idx: cmdOther}
	}
	for i, c := range name {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		b[i] = c
	}
	if info, ok := commandTable[string(b[:len(name)])]; ok {
		return info
	}
	return cmdInfo{idx: cmdOther}
}

// commandName returns the metrics label of a command index.
func commandName(idx uint8) string {
	if int(idx) < len(CommandNames) {
		return CommandNames[idx]
	}
	return "other"
}

// confirmKinds are the first elements of pub/sub confirmations, per family, for subscribe and unsubscribe.
var confirmKinds = [3][2]string{
	famChannel: {"subscribe", "unsubscribe"},
	famPattern: {"psubscribe", "punsubscribe"},
	famShard:   {"ssubscribe", "sunsubscribe"},
}

// equalFold reports whether b equals the lower-case ASCII word s, ignoring case.
func equalFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := range b {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != s[i] {
			return false
		}
	}
	return true
}

// Package resp frames the Redis protocol (RESP2 and RESP3) for a pass-through proxy: it finds where client
// commands and server replies begin and end, decodes just enough of them to classify them, and encodes the
// few messages the proxy writes itself. It knows nothing of the network and holds no connection state;
// every buffer it keeps is bounded and reused, so the steady state allocates nothing per command or reply,
// and bulk bodies are skipped by length, never looked at byte by byte.
//
// Client input is parsed the way redis-server 7.0 parses it (src/networking.c, processInlineBuffer and
// processMultibulkBuffer), including its leniencies and quirks, and protocol errors carry its exact wording,
// so that a client sees through the proxy what it would see talking to Redis directly:
//   - a multibulk count <= 0 is skipped silently; a count above INT_MAX is "invalid multibulk length";
//   - the byte after a header's '\r' and the two bytes after a bulk body are not checked;
//   - a header or inline line holding a NUL byte never ends (Redis searches it with strchr) until it
//     exceeds 64 KiB and becomes a "too big ..." error;
//   - inline commands are split exactly as sdssplitargs splits them (quotes may open inside a word,
//     "\x41" hex and \n \r \t \b \a escapes in double quotes, \' in single quotes).
//
// One rule is made deterministic where Redis depends on read sizes: a line (inline command, or a header
// line up to its '\r') longer than 64 KiB is an error even when its end arrives in the same read.
//
// About github.com/tidwall/redcon: this package uses its Append* functions to encode, and nothing else.
// Its readers do not fit a bounded pass-through: Reader.ReadCommands buffers a whole command however large,
// spins on a count like "*3000000000" (it loops over the count before checking the input), closes the
// connection on "*-10" and "*0" (Redis skips them) and rejects a bulk whose trailer is not CRLF (Redis
// accepts it). Its inline parser is not sdssplitargs: no "\x41" or \a \b escapes, a quote inside a word is
// an error instead of opening a quoted part, and it allocates per argument. It has no reply parser and
// no RESP3.
package resp

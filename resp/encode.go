package resp

import "github.com/tidwall/redcon"

// AppendCommand appends args to dst as a RESP multibulk command ("*N" then one bulk string per argument).
func AppendCommand(dst []byte, args ...string) []byte {
	dst = redcon.AppendArray(dst, len(args))
	for _, a := range args {
		dst = redcon.AppendBulkString(dst, a)
	}
	return dst
}

// AppendError appends the error reply "-" + msg + CRLF to dst. Any CR or LF in msg becomes a space, as
// Redis does, so that the reply stays one line. msg should start with an error code such as "ERR".
func AppendError(dst []byte, msg string) []byte {
	return redcon.AppendError(dst, msg)
}

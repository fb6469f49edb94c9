package resp

import "errors"

// ProtocolError is a client protocol violation, worded exactly as redis-server 7.0 words it. Error returns
// for example "Protocol error: invalid multibulk length"; Redis (and so the proxy) answers "-ERR " + Error()
// and closes the connection.
type ProtocolError struct {
	Msg string // the text after "Protocol error: "
}

func (e *ProtocolError) Error() string { return "Protocol error: " + e.Msg }

// ErrIncomplete reports that the input ends before the command or reply does: the caller reads more.
var ErrIncomplete = errors.New("resp: incomplete input")

// ErrInvalidReply is wrapped by every error about a malformed server reply (the connection to the server
// is then out of step and must be closed).
var ErrInvalidReply = errors.New("resp: invalid reply")

// The fixed protocol errors are allocated once: a client can provoke them at will.
var (
	errInvalidMultibulk = &ProtocolError{"invalid multibulk length"}
	errInvalidBulk      = &ProtocolError{"invalid bulk length"}
	errTooBigMultibulk  = &ProtocolError{"too big mbulk count string"}
	errTooBigBulk       = &ProtocolError{"too big bulk count string"}
	errTooBigInline     = &ProtocolError{"too big inline request"}
	errUnbalancedQuotes = &ProtocolError{"unbalanced quotes in request"}
	errUnauthMultibulk  = &ProtocolError{"unauthenticated multibulk length"}
	errUnauthBulk       = &ProtocolError{"unauthenticated bulk length"}
)

// errExpectedDollar words the error for a bulk header starting with c. Redis formats it with %c and then
// turns CR and LF into spaces so that the reply stays one line.
func errExpectedDollar(c byte) *ProtocolError {
	if c == '\r' || c == '\n' {
		c = ' '
	}
	return &ProtocolError{"expected '$', got '" + string([]byte{c}) + "'"}
}

package proxy

import (
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

func TestTransaction(t *testing.T) {
	var tx transaction
	tx.multi()
	tx.queue([]byte("SET a 1\r\n"), true)
	tx.queue([]byte("*3\r\n$3\r\nSET\r\n"), true) // a streamed command, in two pieces
	tx.queue([]byte("$1\r\nb\r\n$1\r\n2\r\n"), false)
	tx.multi() // nested: an error, changes nothing
	if !tx.open() || tx.count != 2 || string(tx.queued) != "SET a 1\r\n*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$1\r\n2\r\n" {
		t.Fatalf("queued %d %q", tx.count, tx.queued)
	}
	if tx.canReplay(true) || !tx.canReplay(false) {
		t.Fatal("a transaction can be replayed exactly when no keys are watched")
	}
	tx.abort(true)
	if tx.state != txAborted || !tx.nullExec || tx.open() {
		t.Fatalf("after abort: %+v", tx)
	}
	tx.end()
	if tx.state != txNone || tx.count != 0 || len(tx.queued) != 0 {
		t.Fatalf("after end: %+v", tx)
	}

	// Over the bound: nothing is kept, and the rescue aborts (EXECABORT, not null: no WATCH).
	tx.multi()
	tx.queue(make([]byte, maxTxBytes-1), true)
	tx.queue([]byte("xy"), true)
	if tx.canReplay(false) || tx.queued != nil {
		t.Fatal("a transaction over maxTxBytes must not be replayed")
	}
	tx.abort(false)
	if tx.nullExec {
		t.Fatal("without WATCH an aborted EXEC is not a null")
	}
}

func TestReplyMode(t *testing.T) {
	for _, tc := range []struct {
		mode replyMode
		want []bool // takes() for three commands in a row
	}{
		{replyOn, []bool{true, true, true}},
		{replyOff, []bool{false, false, false}},
		{replySkip, []bool{false, true, true}},
	} {
		m := tc.mode
		for i, want := range tc.want {
			if got := m.takes(); got != want {
				t.Errorf("mode %d, command %d: takes() = %v, want %v", tc.mode, i, got, want)
			}
		}
	}
}

func TestHoldBack(t *testing.T) {
	var h holdBack
	if h.holding() {
		t.Fatal("nothing in flight, yet holding")
	}
	h.cmd = newBlocked([][]byte{[]byte("BLPOP"), []byte("k"), []byte("0")}, lookup([]byte("blpop")), time.Now())
	if !h.holding() {
		t.Fatal("a blocking command in flight must hold back later commands")
	}
	h.cmd.answered.Store(true)
	if h.holding() {
		t.Fatal("still holding after the answer")
	}
}

func TestSubscriptions(t *testing.T) {
	var s subscriptions
	s.confirm(famChannel, true, []byte("a"))
	s.confirm(famChannel, true, []byte("b"))
	s.confirm(famPattern, true, []byte("p*"))
	s.confirm(famShard, true, []byte("s"))
	s.confirm(famChannel, true, []byte("a")) // again: still one
	if s.total() != 4 || s.count(famChannel) != 2 {
		t.Fatalf("total %d, channels %d", s.total(), s.count(famChannel))
	}
	if n := s.confirm(famChannel, false, nil); n != 4 { // UNSUBSCRIBE with nothing to unsubscribe
		t.Fatalf("nil confirmation changed the count to %d", n)
	}
	s.confirm(famChannel, false, []byte("a"))
	snap := s.snapshot()
	if len(snap[famChannel]) != 1 || snap[famChannel][0] != "b" || len(snap[famPattern]) != 1 {
		t.Fatalf("snapshot %v", snap)
	}
	s.reset()
	if s.total() != 0 {
		t.Fatal("reset kept subscriptions")
	}
}

// The ledger reaches a safe point only when every reply has been framed to its last byte and written.
func TestLedgerSafePoint(t *testing.T) {
	l := newLedger()
	if !l.idle() {
		t.Fatal("a new ledger is not idle")
	}
	l.push([]entry{{act: actForward}, {act: actAuth}})
	l.settle()
	if l.idle() {
		t.Fatal("idle with a reply still expected")
	}
	l.settle()
	if l.idle() {
		t.Fatal("idle before the replies were written to the client")
	}
	l.delivered()
	if !l.idle() {
		t.Fatal("not idle after every reply was delivered")
	}
}

// Deep pipelines reuse the ledger's ring batch after batch without allocating; a batch that uses under a
// quarter of it, or trim (the idle PING), gives it back.
func TestLedgerRingKeptWhileUsed(t *testing.T) {
	l := newLedger()
	batch := make([]entry, 100)
	cycle := func(es []entry) {
		l.push(es)
		for range es {
			l.settle()
		}
		l.delivered()
	}
	cycle(batch)
	if allocs := testing.AllocsPerRun(20, func() { cycle(batch) }); allocs != 0 {
		t.Errorf("%v allocations per batch of 100, want 0", allocs)
	}
	if len(l.q) != 128 {
		t.Fatalf("ring of %d entries after batches of 100, want 128", len(l.q))
	}
	cycle(batch[:10])
	if l.q != nil {
		t.Errorf("ring of %d entries kept after a batch of 10", len(l.q))
	}
	cycle(batch)
	l.push(batch[:1])
	l.trim()
	if len(l.q) != 128 {
		t.Errorf("trim dropped the ring with an entry outstanding")
	}
	l.settle()
	l.trim()
	if l.q != nil {
		t.Errorf("trim kept a ring of %d entries with nothing outstanding", len(l.q))
	}
}

// waitIdle gives up only after quiet passes with no delivery; each delivery re-arms it.
func TestLedgerWaitIdleRearmedOnProgress(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := newLedger()
		l.push(make([]entry, 4))
		go func() {
			for range 3 {
				time.Sleep(4 * time.Second) // each under the 5 s quiet bound; 12 s in all
				l.settle()
				l.delivered()
			}
		}()
		start := time.Now()
		if l.waitIdle(5 * time.Second) {
			t.Fatal("idle with one reply never delivered")
		}
		if got := time.Since(start); got != 17*time.Second {
			t.Fatalf("gave up after %v, want 17s (12s of progress, then 5s quiet)", got)
		}
		l.settle()
		l.delivered()
		if !l.waitIdle(time.Second) {
			t.Fatal("not idle at the end")
		}
	})
}

func TestLedgerCloseWakesWaiters(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := newLedger()
		l.push([]entry{{}})
		done := make(chan bool)
		go func() { done <- l.waitIdle(forever) }()
		synctest.Wait()
		l.close()
		if <-done {
			t.Fatal("closed with a reply outstanding, yet reported idle")
		}
		if l.push([]entry{{}}) {
			t.Fatal("push after close succeeded")
		}
	})
}

// Settings queued in MULTI are recorded at their place in the transaction; RESET and apply follow redis.
func TestSettings(t *testing.T) {
	var tx transaction
	tx.queueSetting(setting{db: 1}) // no MULTI: not recorded
	tx.multi()
	tx.queue([]byte("GET a\r\n"), true)
	tx.queueSetting(setting{db: 2})
	tx.queue([]byte("SELECT 2\r\n"), true)
	if len(tx.settings) != 1 || tx.settings[0].at != 1 {
		t.Fatalf("settings %+v", tx.settings)
	}
	tx.end()
	if tx.settings != nil {
		t.Fatal("settings kept after EXEC")
	}

	var c carried
	c.apply(setting{db: 3, name: "n", named: true})
	c.apply(setting{db: -1}) // changes nothing
	if st := c.snapshot(); st.db != 3 || st.name != "n" {
		t.Fatalf("got %d %q", st.db, st.name)
	}
	c.apply(setting{db: -1, named: true}) // CLIENT SETNAME "" clears the name
	if st := c.snapshot(); st.name != "" {
		t.Fatalf("name %q", st.name)
	}
	c.apply(setting{db: -1, ro: roOn})
	c.apply(setting{db: -1, tracked: true, track: "T"})
	if st := c.snapshot(); !st.readonly || st.tracking != "T" {
		t.Fatalf("READONLY, tracking: %v %q", st.readonly, st.tracking)
	}
	c.apply(setting{db: -1, ro: roOff})
	c.apply(setting{db: -1, tracked: true}) // CLIENT TRACKING OFF
	if st := c.snapshot(); st.readonly || st.tracking != "" {
		t.Fatalf("READWRITE, tracking off: %v %q", st.readonly, st.tracking)
	}
	c.apply(setting{db: 4, name: "m", named: true, ro: roOn, tracked: true, track: "T"})
	c.reset()
	if st := c.snapshot(); st != (connSettings{}) {
		t.Fatalf("after RESET: %+v", st)
	}

	for _, tc := range []struct {
		args  string
		name  string
		named bool
	}{
		{"HELLO", "", false},
		{"HELLO 3", "", false},
		{"HELLO 3 SETNAME a", "a", true},
		{"HELLO 3 AUTH u p SETNAME a", "a", true},
		{"HELLO 3 SETNAME a SETNAME b", "b", true}, // the last one counts
		{"HELLO 3 SETNAME", "", false},             // an error
		{"HELLO 3 BOGUS x SETNAME a", "", false},   // an error
		{"HELLO 3 AUTH setname p", "", false},      // a username, not the option
	} {
		var args [][]byte
		for _, a := range strings.Fields(tc.args) {
			args = append(args, []byte(a))
		}
		if name, named := helloName(args); name != tc.name || named != tc.named {
			t.Errorf("%s: %q %v, want %q %v", tc.args, name, named, tc.name, tc.named)
		}
	}
}

// A transaction's reply is passed byte for byte however it is split across reads, and each queued
// setting takes effect only if its own element of the reply is not an error (an error nested inside an
// element does not count).
func TestExecReplySettings(t *testing.T) {
	reply := "*4\r\n+OK\r\n*2\r\n-ERR inner\r\n$1\r\nx\r\n-ERR DB index is out of range\r\n+OK\r\n" + "+PONG\r\n"
	sets := []setting{{at: 0, db: 1}, {at: 1, db: 5}, {at: 2, db: 99}, {at: 3, db: -1, name: "alpha", named: true}}
	for cut := 1; cut < len(reply); cut++ {
		srv := &Server{log: slog.New(slog.NewTextHandler(io.Discard, nil)), obs: NopObserver{}, epoch: time.Now(),
			opts: Options{StallTimeout: time.Minute, WriteTimeout: time.Minute}}
		client, app := net.Pipe()
		up, fake := net.Pipe()
		s := &session{srv: srv, log: srv.log, client: client}
		s.init()
		s.led.push([]entry{{act: actExec, cmd: cmdOther, sets: sets}, {act: actForward, cmd: cmdOther}})
		loop := make(chan error, 1)
		go func() { loop <- s.replyLoop(up, &readBuf{}) }()
		go func() { fake.Write([]byte(reply[:cut])); fake.Write([]byte(reply[cut:])) }()
		got := make([]byte, len(reply))
		if _, err := io.ReadFull(app, got); err != nil || string(got) != reply {
			t.Fatalf("cut %d: client got %q, %v", cut, got, err)
		}
		close(s.done) // the session is ending: the loop's end is no loss
		fake.Close()
		<-loop
		if st := s.carry.snapshot(); st.db != 5 || st.name != "alpha" {
			t.Fatalf("cut %d: db %d, name %q; want 5, alpha", cut, st.db, st.name)
		}
		client.Close()
		up.Close()
	}
}

// A refused MULTI opens nothing: what was "queued" ran. An answer to an earlier MULTI, or a second one,
// changes nothing.
func TestTransactionAnswer(t *testing.T) {
	var tx transaction
	tx.multi()
	tx.queue([]byte("INCR c\r\n"), true)
	tx.answer(tx.gen-1, false) // an earlier MULTI's
	if !tx.open() {
		t.Fatal("an earlier MULTI's refusal closed this one")
	}
	tx.answer(tx.gen, false)
	if tx.open() || tx.count != 0 || len(tx.queued) != 0 {
		t.Fatalf("after a refusal: %+v", tx)
	}
	tx.multi()
	tx.answer(tx.gen, true)
	tx.answer(tx.gen, false) // not a second answer to the same MULTI
	if !tx.open() || !tx.answered {
		t.Fatalf("after acceptance: %+v", tx)
	}
}

// Watched keys follow the replies: a refused WATCH watches nothing; UNWATCH queued in MULTI (+QUEUED) and
// an EXEC or DISCARD without MULTI end nothing; EXEC's answer, even EXECABORT or null, ends them.
func TestWatches(t *testing.T) {
	for _, tc := range []struct {
		name  string
		start bool
		eff   watchEffect
		reply string
		want  bool
	}{
		{"WATCH", false, watchAdds, "+OK", true},
		{"WATCH refused", false, watchAdds, "-NOPERM this user has no permissions to run the 'watch' command", false},
		{"WATCH inside MULTI", false, watchAdds, "-ERR WATCH inside MULTI is not allowed", false},
		{"UNWATCH", true, watchEnds, "+OK", false},
		{"UNWATCH queued", true, watchEnds, "+QUEUED", true},
		{"DISCARD", true, watchEnds, "+OK", false},
		{"DISCARD without MULTI", true, watchEnds, "-ERR DISCARD without MULTI", true},
		{"EXEC ran", true, watchExec, "*1", false},
		{"EXEC null", true, watchExec, "*-1", false},
		{"EXEC null RESP3", true, watchExec, "_", false},
		{"EXECABORT", true, watchExec, "-EXECABORT Transaction discarded because of previous errors.", false},
		{"EXEC without MULTI", true, watchExec, "-ERR EXEC without MULTI", true},
		{"EXEC refused", true, watchExec, "-NOPERM this user has no permissions to run the 'exec' command", true},
	} {
		var w watches
		w.on.Store(tc.start)
		w.reply(tc.eff, tc.reply[0], []byte(tc.reply[1:]))
		if got := w.on.Load(); got != tc.want {
			t.Errorf("%s: watching %v, want %v", tc.name, got, tc.want)
		}
	}
}

// What a probe's reply says.
func TestFactsLearn(t *testing.T) {
	for _, tc := range []struct {
		pr    probe
		reply string
		need  bool // more bytes needed
		want  fact
	}{
		{probeClientReply, "+OK\r\n", false, factYes},
		{probeClientReply, "-NOPERM this user has no permissions to run the 'client|reply' command\r\n", false, factNo},
		{probeClientReply, "-ERR unknown subcommand 'REPLY'\r\n", false, factNo},
		{probeReset, "*1\r\n*-1\r\n", false, factNo},
		{probeReset, "*1\r\n_\r\n", false, factNo},
		{probeReset, "*1\r\n*10\r\n$5\r\nreset\r\n", false, factYes},
		{probeReset, "*1\r\n*", true, factUnknown},
		{probeReset, "-NOPERM this user has no permissions to run the 'command|info' command\r\n", false, factUnknown},
	} {
		var f facts
		ok := f.learn(tc.pr, []byte(tc.reply))
		if ok == tc.need || f.get(tc.pr) != tc.want {
			t.Errorf("%d %q: ok %v, fact %d; want ok %v, fact %d", tc.pr, tc.reply, ok, f.get(tc.pr), !tc.need, tc.want)
		}
	}
}

// A wait for a safe point with only optional entries outstanding (answers that may never come) ends after
// optionalQuiet; with any other entry outstanding it waits for it.
func TestLedgerOptional(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := newLedger()
		l.push([]entry{{optional: true}})
		start := time.Now()
		if l.waitIdle(forever) || time.Since(start) != optionalQuiet {
			t.Fatalf("waited %v for an optional answer", time.Since(start))
		}
		l.push([]entry{{}})
		done := make(chan bool)
		go func() { done <- l.waitIdle(forever) }()
		time.Sleep(time.Hour) // the fake clock: nothing comes
		synctest.Wait()
		select {
		case <-done:
			t.Fatal("stopped waiting for a required answer")
		default:
		}
		l.settle()
		l.settle()
		l.delivered()
		if !<-done {
			t.Fatal("not idle after both settled")
		}
	})
}

package metrics

import (
	"slices"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// commandBuckets are command_duration_seconds' upper bounds.
var commandBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

// commandDurations is command_duration_seconds: one histogram per command name that takes many equal
// observations at once (the proxy reports a pipelined batch's commands of one name together), exported at
// scrape time. A name has no series until its first use: with ~130 command names times 16 series per
// histogram, creating all at once would export thousands of series for commands an application never sends.
type commandDurations struct {
	desc   *prometheus.Desc
	byName map[string]*commandHistogram // every proxy.CommandNames entry and "other"; read-only after New
}

// commandHistogram counts one command's observations by bucket (not cumulative; the last is +Inf).
type commandHistogram struct {
	name    string
	buckets [16]atomic.Uint64 // len(commandBuckets)+1 used
	sumNano atomic.Int64
}

func newCommandDurations(names []string) *commandDurations {
	c := &commandDurations{
		desc: prometheus.NewDesc(prometheus.BuildFQName(namespace, "", "command_duration_seconds"),
			"Time from reading a client's command to writing its reply, by lower-case command name "+
				"(names outside a fixed list count as other).", []string{"command"}, nil),
		byName: make(map[string]*commandHistogram, len(names)),
	}
	for _, name := range names {
		c.byName[name] = &commandHistogram{name: name}
	}
	return c
}

// observe records n commands named name that each took d.
func (c *commandDurations) observe(name string, d time.Duration, n int) {
	h, ok := c.byName[name]
	if !ok {
		h = c.byName[other]
	}
	i, _ := slices.BinarySearch(commandBuckets, d.Seconds()) // a bucket's bound is inclusive
	h.buckets[i].Add(uint64(n))
	h.sumNano.Add(int64(d) * int64(n))
}

// Describe implements prometheus.Collector.
func (c *commandDurations) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

// Collect implements prometheus.Collector. A scrape during an observe may see its bucket without its sum.
func (c *commandDurations) Collect(ch chan<- prometheus.Metric) {
	for _, h := range c.byName {
		var count uint64
		bs := make(map[float64]uint64, len(commandBuckets))
		for i, le := range commandBuckets {
			count += h.buckets[i].Load()
			bs[le] = count
		}
		count += h.buckets[len(commandBuckets)].Load()
		if count == 0 {
			continue
		}
		ch <- prometheus.MustNewConstHistogram(c.desc, count, time.Duration(h.sumNano.Load()).Seconds(), bs, h.name)
	}
}

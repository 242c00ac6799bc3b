package etcdstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/internal/keys"
)

// Kinds of ClusterEvent.
const (
	ClusterWaiting     = "waiting"       // a host queued for the build lock while another builds (Host, PID: the waiter; Builder: who builds)
	ClusterBuilding    = "building"      // an attempt took the lock (Host, PID, LogDir; Purpose: the builder's command, when a node runs it in its caller)
	ClusterPublished   = "published"     // the package is available (Host, PID, Size, Seconds, Digest)
	ClusterFailed      = "failed"        // an attempt failed (Host, PID, Error, LogDir)
	ClusterAbandoned   = "abandoned"     // an attempt ended without publishing or failing: its builder died or gave up
	ClusterRemoved     = "removed"       // the package was removed
	ClusterRefTaken    = "ref-taken"     // a holder took a reference (Host, PID, Lease, Purpose)
	ClusterRefDropped  = "ref-dropped"   // a reference was released or its lease ended
	ClusterGCStarted   = "gc-started"    // a collector started a sweep (Host, PID)
	ClusterGCEnded     = "gc-ended"      // the sweep ended
	ClusterNodeJoined  = "node-joined"   // a node registered (Host: its name, PID, Version)
	ClusterNodeLeft    = "node-left"     // a node's registration ended
	ClusterFailureGone = "failure-gone"  // the record of a failed attempt expired or was dropped
	ClusterYield       = "yield"         // a removal (Host) asks nodes that only linger on the package to release it
	ClusterPinned      = "pinned"        // the package was pinned (By, Host, Until; Purpose: the note)
	ClusterUnpinned    = "unpinned"      // its pin was removed, or deleted once expired
	ClusterInvalidated = "invalidated"   // the package was invalidated (By, Host, Reason; Cause: the need it was invalidated with)
	ClusterPodMounted  = "pod-mounted"   // a node (Host) publishes the package as a volume of the pods in Purpose
	ClusterPodUnmount  = "pod-unmounted" // a node (Host) no longer publishes it to the pods in Purpose
)

// ClusterEvent is one thing the cluster did, decoded from a change of the
// store's keys. Rev is the etcd revision of the change: watching again from
// Rev+1 resumes after it.
type ClusterEvent struct {
	Rev     int64     `json:"rev"`
	Kind    string    `json:"kind"`
	ID      string    `json:"id,omitempty"`
	Time    time.Time `json:"time"` // from the record when it has one, else when the watch saw it
	Host    string    `json:"host,omitempty"`
	PID     int       `json:"pid,omitempty"`
	Lease   string    `json:"lease,omitempty"`
	Purpose string    `json:"purpose,omitempty"`
	Builder string    `json:"builder,omitempty"` // for waiting: the host building
	LogDir  string    `json:"log_dir,omitempty"`
	Size    int64     `json:"size,omitempty"`
	Seconds float64   `json:"seconds,omitempty"`
	Digest  string    `json:"digest,omitempty"`
	Error   string    `json:"error,omitempty"`
	Version string    `json:"version,omitempty"`
	By      string    `json:"by,omitempty"`     // pinned, invalidated: the user
	Until   time.Time `json:"until,omitzero"`   // pinned: when the pin expires
	Reason  string    `json:"reason,omitempty"` // invalidated
	Cause   string    `json:"cause,omitempty"`  // invalidated: with this need
}

// holderValue is what the store writes in its lock keys, so that a watcher
// can say who waits and who sweeps.
func (s *Store) holderValue() string {
	return mustJSON(refRecord{Host: s.opt.host, PID: s.pid, Since: time.Now(), Purpose: s.opt.purpose})
}

// WatchCluster calls fn for every ClusterEvent from revision fromRev on (0:
// from now), in revision order, until ctx ends or fn returns an error. It
// first calls ready with the revision it starts from (the first that can be
// reported). A watch cut by the server (leader change, restart) resumes
// after the last revision seen; a start revision that was compacted gives
// ErrCompacted. It returns ctx's error or fn's.
func (s *Store) WatchCluster(ctx context.Context, fromRev int64, ready func(rev int64), fn func(ClusterEvent) error) error {
	d := &decoder{s: s, builders: map[string]*BuildRecord{}}
	// Who builds what just before the first revision, so that the first
	// waiters are told apart from the builder.
	cctx, cancel := s.opCtx(ctx)
	opts := []clientv3.OpOption{clientv3.WithPrefix()}
	if fromRev > 1 {
		opts = append(opts, clientv3.WithRev(fromRev-1))
	}
	resp, err := s.cli.Get(cctx, s.keys.Kind(keys.Build), opts...)
	cancel()
	switch {
	case errors.Is(err, rpctypes.ErrCompacted):
		return fmt.Errorf("%w: %d (the oldest kept revision is newer; start later)", ErrCompacted, fromRev)
	case errors.Is(err, rpctypes.ErrFutureRev):
		cctx, cancel := s.opCtx(ctx)
		now, nerr := s.cli.Get(cctx, s.opt.prefix, clientv3.WithCountOnly())
		cancel()
		if nerr != nil {
			return fmt.Errorf("%w: %d", ErrFutureRevision, fromRev)
		}
		return fmt.Errorf("%w: %d (the current revision is %d)", ErrFutureRevision, fromRev, now.Header.Revision)
	case err != nil:
		return fmt.Errorf("watch: %w", err)
	}
	for _, kv := range resp.Kvs {
		if b, err := decode[BuildRecord](kv.Value); err == nil && b.State == BuildRunning {
			d.builders[s.keys.Parse(string(kv.Key)).ID] = b
		}
	}
	next := fromRev
	if next <= 0 {
		next = resp.Header.Revision + 1
	}
	if ready != nil {
		ready(next)
	}
	for {
		err := s.watchFrom(ctx, next, d, fn, func(rev int64) { next = rev + 1 })
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, rpctypes.ErrCompacted) {
			return fmt.Errorf("%w: %d (the oldest kept revision is newer; start later)", ErrCompacted, next)
		}
		var fnErr fnError
		if errors.As(err, &fnErr) {
			return fnErr.err
		}
		s.opt.logger.Debug("cluster watch ended; resuming", "from", next, "err", err)
		select {
		case <-time.After(500 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

type fnError struct{ err error }

func (e fnError) Error() string { return e.err.Error() }

func (s *Store) watchFrom(ctx context.Context, rev int64, d *decoder, fn func(ClusterEvent) error, seen func(int64)) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := s.cli.Watch(wctx, s.opt.prefix, clientv3.WithPrefix(), clientv3.WithRev(rev), clientv3.WithPrevKV())
	for wr := range wch {
		if err := wr.Err(); err != nil {
			return err
		}
		for _, ce := range d.decode(wr.Events) {
			if err := fn(ce); err != nil {
				return fnError{err}
			}
		}
		if len(wr.Events) > 0 {
			seen(wr.Events[len(wr.Events)-1].Kv.ModRevision)
		}
	}
	return errors.New("watch closed")
}

// decoder turns key changes into ClusterEvents. It remembers the running
// attempts, to tell a waiter from a builder.
type decoder struct {
	s        *Store
	builders map[string]*BuildRecord
}

func (d *decoder) decode(evs []*clientv3.Event) []ClusterEvent {
	// Keys published in each revision: the build record's deletion in a
	// publish Txn is part of "published", not an abandoned attempt.
	published := map[string]int64{}
	for _, ev := range evs {
		if k := d.s.keys.Parse(string(ev.Kv.Key)); k.Kind == keys.Avail && ev.Type == clientv3.EventTypePut {
			published[k.ID] = ev.Kv.ModRevision
		}
	}
	var out []ClusterEvent
	for _, ev := range evs {
		c := change{ev: ev, key: d.s.keys.Parse(string(ev.Kv.Key)), put: ev.Type == clientv3.EventTypePut}
		c.created = c.put && ev.Kv.CreateRevision == ev.Kv.ModRevision
		if ev.PrevKv != nil {
			c.prev = ev.PrevKv.Value
		}
		ce := ClusterEvent{Rev: ev.Kv.ModRevision, Time: time.Now(), ID: c.key.ID}
		var ok bool
		switch c.key.Kind {
		case keys.Avail:
			ok = d.avail(c, &ce)
		case keys.Build:
			ok = d.build(c, &ce, published[c.key.ID] == ev.Kv.ModRevision)
		case keys.Lock:
			ok = d.lock(c, &ce)
		case keys.Ref:
			ok = refChange(c, &ce) || podChange(c, &ce)
		case keys.Pin:
			ok = pinChange(c, &ce)
		case keys.Invalid:
			ok = invalidChange(c, &ce)
		case keys.GC:
			ok = gcChange(c, &ce)
		case keys.Node:
			ok = nodeChange(c, &ce)
		case keys.Ask:
			// A holder count request is not news.
			ce.Kind, ce.Host, ok = ClusterYield, string(ev.Kv.Value), c.created && c.key.Rest == askYield
		case keys.Failed:
			// A put is reported by the build record's "failed".
			ce.Kind, ok = ClusterFailureGone, !c.put
		}
		if ok { // atime, health and the rest are not news
			out = append(out, ce)
		}
	}
	return out
}

// change is one key change being decoded.
type change struct {
	ev      *clientv3.Event
	key     keys.Parsed
	put     bool   // else a deletion
	created bool   // a put that created the key
	prev    []byte // the value before, if any
}

// value is the value the change is about: the new one, or for a deletion
// the one deleted.
func (c change) value() []byte {
	if c.put {
		return c.ev.Kv.Value
	}
	return c.prev
}

func (d *decoder) avail(c change, ce *ClusterEvent) bool {
	if !c.put {
		ce.Kind = ClusterRemoved
		return true
	}
	p, err := decode[PackageRecord](c.ev.Kv.Value)
	if err != nil {
		return false
	}
	delete(d.builders, c.key.ID)
	ce.Kind, ce.Host, ce.PID, ce.Size, ce.Seconds, ce.Digest, ce.Time = ClusterPublished, p.BuiltBy, p.PID, p.Size, p.BuildSeconds, p.Digest, p.BuiltAt
	return true
}

// build decodes a build record's change; published says its deletion is
// part of a publish.
func (d *decoder) build(c change, ce *ClusterEvent, published bool) bool {
	id := c.key.ID
	b, err := decode[BuildRecord](c.value())
	if !c.put {
		delete(d.builders, id)
		if published || err != nil || b.State == BuildFailed {
			return false // published, or the failed record's lease ended
		}
		ce.Kind, ce.Host, ce.PID, ce.LogDir = ClusterAbandoned, b.Host, b.PID, b.LogDir
		return true
	}
	if err != nil {
		return false
	}
	ce.Host, ce.PID, ce.LogDir, ce.Purpose = b.Host, b.PID, b.LogDir, b.Command
	if b.State == BuildFailed {
		delete(d.builders, id)
		ce.Kind, ce.Error = ClusterFailed, b.Error
	} else {
		d.builders[id] = b
		ce.Kind, ce.Time = ClusterBuilding, b.Started
	}
	return true
}

func (d *decoder) lock(c change, ce *ClusterEvent) bool {
	b := d.builders[c.key.ID]
	if !c.created || b == nil {
		return false // the first in the queue builds (or removes): reported as such
	}
	ce.Kind, ce.Lease, ce.Builder = ClusterWaiting, c.key.Rest, b.Host
	if h, err := decode[refRecord](c.ev.Kv.Value); err == nil {
		ce.Host, ce.PID, ce.Time = h.Host, h.PID, h.Since
	}
	return true
}

func refChange(c change, ce *ClusterEvent) bool {
	ce.Lease, _, _ = strings.Cut(c.key.Rest, "/")
	switch {
	case c.created:
		ce.Kind = ClusterRefTaken
	case !c.put:
		ce.Kind = ClusterRefDropped
	default:
		return false
	}
	if r, err := decode[refRecord](c.value()); err == nil {
		ce.Host, ce.PID, ce.Purpose = r.Host, r.PID, r.Purpose
		if c.created {
			ce.Time = r.Since
		}
	}
	return true
}

func gcChange(c change, ce *ClusterEvent) bool {
	ce.ID, ce.Lease = "", c.key.ID
	switch {
	case c.created:
		ce.Kind = ClusterGCStarted
		if h, err := decode[refRecord](c.ev.Kv.Value); err == nil {
			ce.Host, ce.PID = h.Host, h.PID
		}
	case !c.put:
		ce.Kind = ClusterGCEnded
	default:
		return false
	}
	return true
}

func nodeChange(c change, ce *ClusterEvent) bool {
	ce.ID, ce.Host, ce.Lease = "", c.key.ID, c.key.Rest
	switch {
	case c.created:
		ce.Kind = ClusterNodeJoined
	case !c.put:
		ce.Kind = ClusterNodeLeft
	default:
		return false
	}
	var reg struct {
		PID     int       `json:"pid"`
		Version string    `json:"version"`
		Started time.Time `json:"started"` // node.Registration's
	}
	if json.Unmarshal(c.value(), &reg) == nil {
		ce.PID, ce.Version = reg.PID, reg.Version
		if c.created && !reg.Started.IsZero() {
			ce.Time = reg.Started // a replayed join keeps its own time
		}
	}
	return true
}

// podChange reports the pods a rewrite of a node's cached reference added
// or removed (RecordPods), as one event for the first kind that changed.
func podChange(c change, ce *ClusterEvent) bool {
	if !c.put || c.created {
		return false
	}
	now, err1 := decode[refRecord](c.ev.Kv.Value)
	was, err2 := decode[refRecord](c.prev)
	if err1 != nil || err2 != nil {
		return false
	}
	ce.Lease, _, _ = strings.Cut(c.key.Rest, "/")
	ce.Host, ce.PID = now.Host, now.PID
	if added := missing(now.Pods, was.Pods); len(added) > 0 {
		ce.Kind, ce.Purpose = ClusterPodMounted, "pod "+strings.Join(added, ", pod ")
		return true
	}
	if gone := missing(was.Pods, now.Pods); len(gone) > 0 {
		ce.Kind, ce.Purpose = ClusterPodUnmount, "pod "+strings.Join(gone, ", pod ")
		return true
	}
	return false
}

// missing returns the elements of a that b lacks.
func missing(a, b []string) []string {
	var out []string
	for _, x := range a {
		if !slices.Contains(b, x) {
			out = append(out, x)
		}
	}
	return out
}

func pinChange(c change, ce *ClusterEvent) bool {
	if !c.put {
		ce.Kind = ClusterUnpinned
		return true
	}
	p, err := decode[PinRecord](c.ev.Kv.Value)
	if err != nil {
		return false
	}
	ce.Kind, ce.By, ce.Host, ce.Time, ce.Until, ce.Purpose = ClusterPinned, p.By, p.Host, p.At, p.Until, p.Note
	return true
}

func invalidChange(c change, ce *ClusterEvent) bool {
	if !c.put {
		return false // the removal that deletes it is reported as removed
	}
	r, err := decode[InvalidRecord](c.ev.Kv.Value)
	if err != nil {
		return false
	}
	ce.Kind, ce.By, ce.Host, ce.Time, ce.Reason, ce.Cause = ClusterInvalidated, r.By, r.Host, r.At, r.Reason, r.Cause
	return true
}

package etcdstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Kinds of ClusterEvent.
const (
	ClusterWaiting     = "waiting"      // a host queued for the build lock while another builds (Host, PID: the waiter; Builder: who builds)
	ClusterBuilding    = "building"     // an attempt took the lock (Host, PID, LogDir; Purpose: the builder's command, when a node runs it in its caller)
	ClusterPublished   = "published"    // the package is available (Host, PID, Size, Seconds, Digest)
	ClusterFailed      = "failed"       // an attempt failed (Host, PID, Error, LogDir)
	ClusterAbandoned   = "abandoned"    // an attempt ended without publishing or failing: its builder died or gave up
	ClusterRemoved     = "removed"      // the package was removed
	ClusterRefTaken    = "ref-taken"    // a holder took a reference (Host, PID, Lease, Purpose)
	ClusterRefDropped  = "ref-dropped"  // a reference was released or its lease ended
	ClusterGCStarted   = "gc-started"   // a collector started a sweep (Host, PID)
	ClusterGCEnded     = "gc-ended"     // the sweep ended
	ClusterNodeJoined  = "node-joined"  // a node registered (Host: its name, PID, Version)
	ClusterNodeLeft    = "node-left"    // a node's registration ended
	ClusterFailureGone = "failure-gone" // the record of a failed attempt expired or was dropped
	ClusterYield       = "yield"        // a removal (Host) asks nodes that only linger on the package to release it
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
}

// ErrCompacted is returned by WatchCluster when the revision to start from
// was compacted away: etcd no longer has that history.
var ErrCompacted = errors.New("etcdstore: revision compacted")

// ErrFutureRevision is returned by WatchCluster for a start revision
// etcd has not reached yet.
var ErrFutureRevision = errors.New("etcdstore: revision not reached yet")

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
	resp, err := s.cli.Get(cctx, s.opt.prefix+"build/", opts...)
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
		return fmt.Errorf("etcdstore: watch: %w", err)
	}
	for _, kv := range resp.Kvs {
		if b, err := decode[BuildRecord](kv.Value); err == nil && b.State == BuildRunning {
			d.builders[strings.TrimPrefix(string(kv.Key), s.opt.prefix+"build/")] = b
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
	pfx := d.s.opt.prefix
	// Keys published in each revision: the build record's deletion in a
	// publish Txn is part of "published", not an abandoned attempt.
	published := map[string]int64{}
	for _, ev := range evs {
		if rest, ok := strings.CutPrefix(string(ev.Kv.Key), pfx+"avail/"); ok && ev.Type == clientv3.EventTypePut {
			published[rest] = ev.Kv.ModRevision
		}
	}
	var out []ClusterEvent
	for _, ev := range evs {
		key := strings.TrimPrefix(string(ev.Kv.Key), pfx)
		kind, rest, _ := strings.Cut(key, "/")
		put := ev.Type == clientv3.EventTypePut
		created := put && ev.Kv.CreateRevision == ev.Kv.ModRevision
		ce := ClusterEvent{Rev: ev.Kv.ModRevision, Time: time.Now()}
		var prev []byte
		if ev.PrevKv != nil {
			prev = ev.PrevKv.Value
		}
		switch kind {
		case "avail":
			ce.ID = rest
			if !put {
				ce.Kind = ClusterRemoved
				break
			}
			p, err := decode[PackageRecord](ev.Kv.Value)
			if err != nil {
				continue
			}
			delete(d.builders, rest)
			ce.Kind, ce.Host, ce.PID, ce.Size, ce.Seconds, ce.Digest, ce.Time = ClusterPublished, p.BuiltBy, p.PID, p.Size, p.BuildSeconds, p.Digest, p.BuiltAt
		case "build":
			ce.ID = rest
			if !put {
				b, err := decode[BuildRecord](prev)
				delete(d.builders, rest)
				if published[rest] == ev.Kv.ModRevision || (err == nil && b.State == BuildFailed) || err != nil {
					continue // published, or the failed record's lease ended
				}
				ce.Kind, ce.Host, ce.PID, ce.LogDir = ClusterAbandoned, b.Host, b.PID, b.LogDir
				break
			}
			b, err := decode[BuildRecord](ev.Kv.Value)
			if err != nil {
				continue
			}
			ce.Host, ce.PID, ce.LogDir, ce.Purpose = b.Host, b.PID, b.LogDir, b.Command
			if b.State == BuildFailed {
				delete(d.builders, rest)
				ce.Kind, ce.Error = ClusterFailed, b.Error
			} else {
				d.builders[rest] = b
				ce.Kind, ce.Time = ClusterBuilding, b.Started
			}
		case "lock":
			id, lease, _ := strings.Cut(rest, "/")
			b := d.builders[id]
			if !created || b == nil {
				continue // the first in the queue builds (or removes): reported as such
			}
			ce.Kind, ce.ID, ce.Lease, ce.Builder = ClusterWaiting, id, lease, b.Host
			if h, err := decode[refRecord](ev.Kv.Value); err == nil {
				ce.Host, ce.PID, ce.Time = h.Host, h.PID, h.Since
			}
		case "ref":
			id, lease, _ := strings.Cut(rest, "/")
			lease, _, _ = strings.Cut(lease, "/")
			ce.ID, ce.Lease = id, lease
			val := ev.Kv.Value
			switch {
			case created:
				ce.Kind = ClusterRefTaken
			case !put:
				ce.Kind, val = ClusterRefDropped, prev
			default:
				continue
			}
			if r, err := decode[refRecord](val); err == nil {
				ce.Host, ce.PID, ce.Purpose = r.Host, r.PID, r.Purpose
				if created {
					ce.Time = r.Since
				}
			}
		case "gc":
			ce.Lease = rest
			switch {
			case created:
				ce.Kind = ClusterGCStarted
				if h, err := decode[refRecord](ev.Kv.Value); err == nil {
					ce.Host, ce.PID = h.Host, h.PID
				}
			case !put:
				ce.Kind = ClusterGCEnded
			default:
				continue
			}
		case "node":
			name, lease, _ := strings.Cut(rest, "/")
			ce.Host, ce.Lease = name, lease
			val := ev.Kv.Value
			switch {
			case created:
				ce.Kind = ClusterNodeJoined
			case !put:
				ce.Kind, val = ClusterNodeLeft, prev
			default:
				continue
			}
			var reg struct {
				PID     int       `json:"pid"`
				Version string    `json:"version"`
				Started time.Time `json:"started"` // node.Registration's
			}
			if json.Unmarshal(val, &reg) == nil {
				ce.PID, ce.Version = reg.PID, reg.Version
				if created && !reg.Started.IsZero() {
					ce.Time = reg.Started // a replayed join keeps its own time
				}
			}
		case "ask":
			what, id, _ := strings.Cut(rest, "/")
			if !created || what != askYield {
				continue // a holder count request is not news
			}
			ce.Kind, ce.ID, ce.Host = ClusterYield, id, string(ev.Kv.Value)
		case "failed":
			if put {
				continue // reported by the build record's "failed"
			}
			ce.Kind, ce.ID = ClusterFailureGone, rest
		default:
			continue // atime, health
		}
		out = append(out, ce)
	}
	return out
}

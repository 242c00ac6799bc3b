package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/internal/keys"
)

// Invalidation marks a published package bad cluster-wide:
//
//   - P/invalid/<id> (no lease) is put only while the package is published.
//     IncRef's Txn requires it absent, so from its revision on no reference
//     is granted; references taken before stay until their holders leave.
//   - Every package that needs it (transitively) is invalidated with it,
//     farthest dependents first, so that a reference is never granted on a
//     package whose closure is already invalid. Each Txn also requires
//     that no new dependent appeared since the graph was read; if one did,
//     the invalidation starts over with it.
//   - The removal Txn of an invalid package deletes P/invalid/<id> and
//     keeps its record at P/invalidated/<id> on a lease of the failure
//     retention, for inspect and ls. Removal happens at once when nothing
//     holds the package, else when the last holder leaves (the nodes'
//     sweepers watch the package's references, WatchInvalid), and at the
//     latest at the next gc.
//   - Build of an invalid package waits for its removal, then builds anew.

// InvalidRecord is the value of P/invalid/<id> (and, once the package is
// removed, of P/invalidated/<id>).
type InvalidRecord struct {
	By     string    `json:"by"` // user who invalidated
	Host   string    `json:"host"`
	At     time.Time `json:"at"`
	Reason string    `json:"reason"`
	// Cause is the need whose invalidation invalidated this package ("" for
	// the package named by the operator).
	Cause string `json:"cause,omitempty"`
	// Digest and Attempt identify the publish that was invalidated.
	Digest  string    `json:"digest,omitempty"`
	Attempt int64     `json:"attempt,omitempty"`
	Removed time.Time `json:"removed,omitzero"` // in P/invalidated/<id>: when it was removed
}

// err is the error a reference on the invalid package id returns.
func (r *InvalidRecord) err(id string) error {
	why := r.Reason
	if r.Cause != "" {
		why = fmt.Sprintf("it needs %s, which was invalidated: %s", r.Cause, r.Reason)
	}
	return fmt.Errorf("%w: %w: %s invalidated by %s on %s at %s: %s", core.ErrPackageNotExist, core.ErrInvalidated,
		id, r.By, r.Host, r.At.Format(time.RFC3339), why)
}

// InvalidateReport is what Invalidate did.
type InvalidateReport struct {
	// Invalidated lists the package and its dependents, dependents first
	// (those already invalid included).
	Invalidated []string `json:"invalidated"`
	Removed     []string `json:"removed"` // removed at once: nothing held them
	Held        []string `json:"held"`    // removed when their last holder leaves (or by the sweepers, if the removal failed)
}

// Invalidate marks id and every package that needs it invalid (see the
// comment above), then removes those that nothing holds. by names the
// user. It returns an error wrapping core.ErrPackageNotExist when id is
// not published.
func (s *Store) Invalidate(ctx context.Context, id, reason, by string) (InvalidateReport, error) {
	var rep InvalidateReport
	if err := core.ValidateID(id); err != nil {
		return rep, fmt.Errorf("invalidate: %w", err)
	}
	at := time.Now().UTC()
	for tries := 0; ; tries++ {
		order, rev, err := s.dependents(ctx, id)
		if s.testHookInvalidate != nil && err == nil {
			s.testHookInvalidate(id)
		}
		done := false
		if err == nil {
			done, err = s.invalidateAll(ctx, order, rev, InvalidRecord{By: by, Host: s.opt.host, At: at, Reason: reason}, id)
		}
		if err != nil && transient(err) && tries < 4 && sleepCtx(ctx, time.Duration(tries+1)*100*time.Millisecond) {
			// Cut by a member that froze or went away: every step can be
			// made again (an invalid record stands; the first reason wins).
			continue
		}
		if err != nil {
			return rep, fmt.Errorf("invalidate %q: %w", id, err)
		}
		if done {
			rep.Invalidated = order
			break
		}
		if tries > 20 {
			return rep, fmt.Errorf("invalidate %q: its dependents keep changing", id)
		}
	}
	for _, p := range rep.Invalidated {
		ok, err := s.tryRemove(ctx, p, 0, true)
		switch {
		case ok:
			rep.Removed = append(rep.Removed, p)
		case err == nil:
			rep.Held = append(rep.Held, p)
		case errors.Is(err, core.ErrPackageNotExist):
			// removed meanwhile by someone else
		default:
			// The invalidation stands; the nodes' sweepers and gc remove it.
			s.opt.logger.Warn("invalidated, but its removal failed; the sweepers and gc try again", "id", p, "err", err)
			rep.Held = append(rep.Held, p)
		}
	}
	return rep, nil
}

// dependents returns id's dependents, farthest first, then id, as read at
// revision rev.
func (s *Store) dependents(ctx context.Context, id string) (order []string, rev int64, err error) {
	seen := map[string]bool{id: true}
	queue := []string{id}
	for i := 0; i < len(queue); i++ {
		cctx, cancel := s.opCtx(ctx)
		opts := []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithKeysOnly()}
		if rev > 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := s.cli.Get(cctx, s.keys.NeededBy(queue[i]), opts...)
		cancel()
		if err != nil {
			return nil, 0, err
		}
		if rev == 0 {
			rev = resp.Header.Revision // one snapshot for the whole graph
		}
		for _, kv := range resp.Kvs {
			if d := s.keys.Parse(string(kv.Key)).Rest; !seen[d] {
				seen[d] = true
				queue = append(queue, d)
			}
		}
	}
	slices.Reverse(queue) // breadth-first reversed: every dependent before what it needs
	return queue, rev, nil
}

// invalidateAll puts the invalid records of order, one Txn each, each
// requiring that its package has no dependent newer than rev. It reports
// false when one has: the caller reads the graph again.
func (s *Store) invalidateAll(ctx context.Context, order []string, rev int64, base InvalidRecord, id string) (bool, error) {
	for _, p := range order {
		rec := base
		if p != id {
			rec.Cause = id
		}
		st, err := s.readState(ctx, p)
		if err != nil {
			return false, err
		}
		if st.avail == nil {
			if p == id {
				return false, core.ErrPackageNotExist
			}
			continue // removed meanwhile
		}
		rec.Digest, rec.Attempt = st.avail.Digest, st.avail.Attempt
		cctx, cancel := s.opCtx(ctx)
		resp, err := s.cli.Txn(cctx).
			If(
				// Published, as read (the record names that publish): an
				// absent package is not invalidated (its next build is
				// simply a build).
				clientv3.Compare(clientv3.ModRevision(s.keys.AvailKey(p)), "=", st.availRev),
				// Not invalid already: the first reason stands.
				clientv3.Compare(clientv3.CreateRevision(s.keys.InvalidKey(p)), "=", 0),
				// No dependent published since the graph was read (each
				// edge in the range must be older).
				clientv3.Compare(clientv3.CreateRevision(s.keys.NeededBy(p)), "<", rev+1).WithPrefix(),
			).
			Then(clientv3.OpPut(s.keys.InvalidKey(p), mustJSON(rec))).
			Else(clientv3.OpGet(s.keys.InvalidKey(p), clientv3.WithCountOnly())).
			Commit()
		cancel()
		if err != nil {
			return false, err
		}
		if resp.Succeeded {
			s.emit(Event{Kind: EventInvalidated, ID: p, Host: base.Host, Err: errors.New(rec.Reason)})
			// Our own cached reference needs no watch to learn it: a node
			// refuses its next local holder from now on.
			s.refs.mu.Lock()
			r := s.newestCached(p)
			s.refs.mu.Unlock()
			if r != nil {
				s.refInvalid(p, r, &rec)
			}
			continue
		}
		if resp.Responses[0].GetResponseRange().Count > 0 {
			continue // invalid already: the first reason stands
		}
		return false, nil // removed (or built again), or a new dependent: start over
	}
	return true, nil
}

// invalidOf reads P/invalid/<id>, or nil.
func (s *Store) invalidOf(ctx context.Context, id string) (*InvalidRecord, error) {
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Get(cctx, s.keys.InvalidKey(id))
	if err != nil || len(resp.Kvs) == 0 {
		return nil, err
	}
	return decode[InvalidRecord](resp.Kvs[0].Value)
}

// removedInvalidOps are what the removal Txn of an invalid package adds: the
// record moves from P/invalid to P/invalidated, on a lease of the failure
// retention, granted here before the Txn (the caller revokes it if the Txn
// does not apply).
func (s *Store) removedInvalidOps(ctx context.Context, id string, rec *InvalidRecord) ([]clientv3.Op, clientv3.LeaseID, error) {
	if rec == nil {
		return nil, 0, nil
	}
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	lease, err := s.cli.Grant(cctx, max(int64(s.opt.failureRetention/time.Second), 1))
	if err != nil {
		return nil, 0, fmt.Errorf("grant the invalidation record's lease: %w", err)
	}
	gone := *rec
	gone.Removed = time.Now().UTC()
	return []clientv3.Op{
		clientv3.OpDelete(s.keys.InvalidKey(id)),
		clientv3.OpPut(s.keys.InvalidatedKey(id), mustJSON(gone), clientv3.WithLease(lease.ID)),
	}, lease.ID, nil
}

// removeInvalid is DecRef's last step when the package it released is
// invalid: if that was the last reference, remove it now, and then every
// invalid package that it alone kept (its invalid needs). It does not ask
// nodes to yield (their last local holder releases an invalid package at
// once, and their sweeper removes it); errors are logged, as the sweepers
// and the next gc try again.
func (s *Store) removeInvalid(ctx context.Context, id string) {
	ctx = context.WithoutCancel(ctx)
	ok, err := s.tryRemove(ctx, id, 0, false)
	if err == nil && ok {
		_, err = s.sweepInvalid(ctx, false)
	}
	if err != nil && !errors.Is(err, core.ErrPackageNotExist) {
		s.opt.logger.Warn("removing an invalidated package after its last holder left failed; the sweepers and gc try again", "id", id, "err", err)
	}
}

// SweepInvalid tries once to remove every invalid package, dependents
// before their needs, and returns those it removed.
func (s *Store) SweepInvalid(ctx context.Context) ([]string, error) { return s.sweepInvalid(ctx, true) }

// sweepInvalid is SweepInvalid; with yield, a package that only nodes'
// cached references hold is asked for.
func (s *Store) sweepInvalid(ctx context.Context, yield bool) ([]string, error) {
	var ids []string
	err := s.scan(ctx, keys.Invalid, true, func(id string, _ *mvccpb.KeyValue) error {
		ids = append(ids, id)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("sweep invalid: %w", err)
	}
	return s.removeInvalidIDs(ctx, ids, yield)
}

// removeInvalidIDs tries to remove the invalid packages ids until a pass
// removes none (a dependent's removal may free its needs), and returns
// those it removed.
func (s *Store) removeInvalidIDs(ctx context.Context, ids []string, yield bool) ([]string, error) {
	var removed []string
	for progress := true; progress && len(ids) > 0; {
		progress = false
		var left []string
		for _, id := range ids {
			ok, err := s.tryRemove(ctx, id, 0, yield)
			switch {
			case ok || errors.Is(err, core.ErrPackageNotExist):
				if ok {
					removed = append(removed, id)
				}
				progress = true
			case err != nil:
				return removed, fmt.Errorf("sweep invalid %q: %w", id, err)
			default:
				left = append(left, id)
			}
		}
		ids = left
	}
	return removed, nil
}

// WatchInvalid removes invalid packages as soon as nothing holds them: it
// sweeps at start, whenever a package is invalidated, and whenever a
// reference on an invalid package or a need edge to one is deleted, until
// ctx ends. Nodes run it; without nodes, an invalid package goes at the
// invalidation itself, at the DecRef of its last holder, or at the next
// Prune.
func (s *Store) WatchInvalid(ctx context.Context) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	for ctx.Err() == nil {
		// The invalid packages before the sweep; the watches start from
		// that read, so a change the sweep could not see yet (a removal
		// under way elsewhere, which it found locked; an edge deleted
		// after it tried the need) brings another sweep.
		cctx, cancel := s.opCtx(wctx)
		before, err := s.cli.Get(cctx, s.keys.Kind(keys.Invalid), clientv3.WithPrefix(), clientv3.WithKeysOnly())
		cancel()
		if err == nil {
			var ids []string
			for _, kv := range before.Kvs {
				ids = append(ids, s.keys.Parse(string(kv.Key)).ID)
			}
			if _, err := s.removeInvalidIDs(ctx, ids, true); err != nil {
				s.opt.logger.Warn("sweep of invalid packages failed; trying again", "err", err)
			}
			// One watch on the whole prefix would carry every reference
			// of the farm; invalid packages are few, so watch what
			// concerns them.
			err = s.awaitInvalidChange(wctx, before)
		}
		if err != nil {
			sleepCtx(ctx, time.Second)
		}
	}
	return ctx.Err()
}

// awaitInvalidChange returns when, after the read before, an invalidation
// is put, or a reference or need edge of a package invalid in that read is
// deleted, or after a minute.
func (s *Store) awaitInvalidChange(ctx context.Context, before *clientv3.GetResponse) error {
	wctx, stop := context.WithTimeout(ctx, time.Minute)
	defer stop()
	from := clientv3.WithRev(before.Header.Revision + 1)
	chans := []clientv3.WatchChan{s.cli.Watch(wctx, s.keys.Kind(keys.Invalid), clientv3.WithPrefix(), from, clientv3.WithFilterDelete())}
	for _, kv := range before.Kvs {
		id := s.keys.Parse(string(kv.Key)).ID
		chans = append(chans,
			s.cli.Watch(wctx, s.keys.RefPrefix(id), clientv3.WithPrefix(), from, clientv3.WithFilterPut()),
			s.cli.Watch(wctx, s.keys.NeededBy(id), clientv3.WithPrefix(), from, clientv3.WithFilterPut()))
	}
	got := make(chan error, len(chans))
	for _, ch := range chans {
		go func() {
			for wr := range ch {
				if err := wr.Err(); err != nil || len(wr.Events) > 0 {
					got <- err
					return
				}
			}
			got <- nil
		}()
	}
	err := <-got
	stop() // ends the other watches; their goroutines drain into got
	return err
}

// invalidWait says a build found its package published but invalid: it
// waits for the removal (awaitRemoval), then builds anew.
type invalidWait struct {
	rev int64 // revision of the read
	rec *InvalidRecord
}

func (e *invalidWait) Error() string { return "the package is invalidated: " + e.rec.Reason }

// awaitRemoval waits until id's published record, seen invalid at w.rev, is
// deleted.
func (s *Store) awaitRemoval(ctx context.Context, id string, w *invalidWait) error {
	s.emit(Event{Kind: EventWaitInvalid, ID: id, Host: w.rec.Host, Since: w.rec.At, Err: fmt.Errorf("invalidated by %s on %s at %s: %s",
		w.rec.By, w.rec.Host, w.rec.At.Format(time.RFC3339), w.rec.Reason)})
	s.opt.logger.Info("waiting for the invalidated package to be removed (its holders to leave) before building it anew",
		"id", id, "invalidated_by", w.rec.By, "reason", w.rec.Reason)
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	defer context.AfterFunc(s.ctx, cancel)()
	for wr := range s.cli.Watch(wctx, s.keys.AvailKey(id), clientv3.WithRev(w.rev+1), clientv3.WithFilterPut()) {
		if err := wr.Err(); err != nil {
			return &retryError{why: err}
		}
		if len(wr.Events) > 0 {
			return nil
		}
	}
	return wctxErr(ctx, wctx)
}

package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/internal/keys"
)

// Proving cached references, and keeping etcd's references and the
// store's table the same.
//
// A node grants its jobs a package from its cached reference without
// asking etcd. That is only sound while the reference's key is in etcd:
// once it is gone (its lease revoked by an operator or a thawed leader,
// expired, or the key deleted), any host may remove the package. So the
// store watches the key of every cached reference after the revision that
// put it (followKey), and RefProven holds only while
//
//  1. the watch has not reported the key's deletion (nor failed: while it
//     is set up again, a deletion could go unheard),
//  2. the key is on the session's current lease, and the lease is trusted:
//     a keep-alive acknowledgement came within 2/3 of the TTL (the guard).
//
// What remains is the watch's latency: a deletion that etcd applied but
// whose event has not reached this store yet (milliseconds on a healthy
// stream; if the member serving the watch stopped answering, until the
// client moves off it: the member watch's probe, TTL/10, or a revocation's
// next keep-alive answer, TTL/3, whichever comes first). A removal on
// another host needs two more Txns after the deletion, so in practice the
// node hears first; when it does not, the job that got the package in that
// window is told the reference is lost as soon as the node hears, exactly
// as a job on a lost lease is.
//
// When the key goes, the store takes the reference again on its current
// lease at once (if the lease itself is gone, it makes a new one and
// retakes every reference), or reports it lost (EventRefLost) if the
// package was removed meanwhile.
//
// The other direction: a reference key that the store does not know of
// pins a package until the lease ends, which for a node is its restart.
// putRef resolves an ambiguous outcome with a read of its own, but a Txn
// stuck in a frozen leader can still apply after the store gave up on it.
// ReconcileRefs lists the keys on the store's lease (LeaseTimeToLive with
// its attached keys) and deletes the references it does not track.

// watchRef reports the deletion of key, r's reference on id put at
// revision rev, until ctx ends (r released or moved, or the store closed).
func (s *Store) watchRef(ctx context.Context, id string, r *ref, key string, rev int64) {
	b := refRetry()
	setUnwatched := func(v bool) {
		s.refs.mu.Lock()
		if r.key == key {
			r.unwatched = v
		}
		s.refs.mu.Unlock()
	}
	for ctx.Err() == nil {
		gone := s.followKey(ctx, key, rev,
			func(kvs []*mvccpb.KeyValue) bool { return len(kvs) == 0 },
			func(ev *clientv3.Event) bool { return ev.Type == clientv3.EventTypeDelete },
			func() { b.Reset(); setUnwatched(false) }, clientv3.WithFilterPut())
		if gone {
			s.refDeleted(id, r, key, "its key was deleted in etcd (lease revoked or expired, or the key deleted)")
			return
		}
		if ctx.Err() != nil {
			return // r released or moved to another key: not ours to mark
		}
		// The watch ended (or could not start) without the deletion. Until
		// it is back, the reference is not proven; followKey reads the key
		// again when it starts the next one.
		setUnwatched(true)
		if !sleepCtx(ctx, b.NextBackOff()) {
			return
		}
	}
}

// watchInvalid marks r, a cached reference on id taken at revision rev,
// invalid when P/invalid/<id> is put, until ctx ends. While its watch is
// down, r is not proven.
func (s *Store) watchInvalid(ctx context.Context, id string, r *ref, rev int64) {
	b := refRetry()
	key := s.keys.InvalidKey(id)
	var inv *InvalidRecord
	invalid := func(v []byte) bool {
		rec, err := decode[InvalidRecord](v)
		inv = rec
		return err == nil
	}
	for ctx.Err() == nil {
		if s.followKey(ctx, key, rev,
			func(kvs []*mvccpb.KeyValue) bool { return len(kvs) > 0 && invalid(kvs[0].Value) },
			func(ev *clientv3.Event) bool { return invalid(ev.Kv.Value) },
			func() { b.Reset(); s.setInvalidUnwatched(r, false) }, clientv3.WithFilterDelete()) {
			s.refInvalid(id, r, inv)
			return
		}
		if ctx.Err() != nil {
			return // r released or moved to another key: not ours to mark
		}
		// Not proven until the next watch is up (followKey reads the key
		// again when it starts it).
		s.setInvalidUnwatched(r, true)
		if !sleepCtx(ctx, b.NextBackOff()) {
			return
		}
	}
}

// followKey watches key, for the events opts let through, after revision
// rev: from the current revision (watchNow: a watch started in the past is
// served late), after reading key if the revision moved since rev. It
// reports true as soon as found says so of what that read saw, or event of
// an event; false when the watch ended (ctx ended, compaction, no leader)
// or could not start. watching is called once the watch covers every
// revision after rev.
func (s *Store) followKey(ctx context.Context, key string, rev int64, found func([]*mvccpb.KeyValue) bool,
	event func(*clientv3.Event) bool, watching func(), opts ...clientv3.OpOption) bool {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wch, from, err := s.watchNow(ctx, wctx, key, opts...)
	if err != nil {
		return false
	}
	if from > rev {
		gctx, gcancel := s.opCtx(ctx)
		resp, err := s.cli.Get(gctx, key)
		gcancel()
		if err != nil {
			return false
		}
		if found(resp.Kvs) {
			return true
		}
	}
	watching()
	for wr := range wch {
		if wr.Err() != nil {
			return false
		}
		for _, ev := range wr.Events {
			if event(ev) {
				return true
			}
		}
	}
	return false
}

func (s *Store) setInvalidUnwatched(r *ref, v bool) {
	s.refs.mu.Lock()
	r.invalidUnwatched = v
	s.refs.mu.Unlock()
}

// refInvalid records that the package of r, a cached reference, was
// invalidated.
func (s *Store) refInvalid(id string, r *ref, inv *InvalidRecord) {
	s.refs.mu.Lock()
	known := r.invalid != nil
	r.invalid, r.invalidUnwatched = inv, false
	s.refs.mu.Unlock()
	if known {
		return
	}
	s.emit(Event{Kind: EventRefInvalid, ID: id, Host: inv.Host, Err: inv.err(id)})
}

// refDeleted handles the deletion of key, r's reference on id, that the
// store did not make: r is no longer proven, and it is taken again (or
// found lost) in the background.
func (s *Store) refDeleted(id string, r *ref, key, why string) {
	s.refs.mu.Lock()
	if r.released || r.lost || r.key != key || r.gone != nil {
		s.refs.mu.Unlock()
		return
	}
	r.gone = make(chan struct{})
	s.refs.mu.Unlock()
	s.opt.logger.Warn("reference deleted behind the store's back; taking it again", "id", id, "key", key, "why", why)
	s.emit(Event{Kind: EventRefDeleted, ID: id, Err: errors.New(why), Host: s.opt.host, PID: s.pid})
	s.spawn(func() { s.retakeOne(id, r, key) })
}

// retakeOne puts r, whose key etcd deleted, back on the current lease, or
// marks it lost if the package is gone. If the lease itself is gone, it
// gives the lease up, and the session's renewal takes r again with every
// other reference (retakeRefs).
func (s *Store) retakeOne(id string, r *ref, key string) {
	if s.testHookRetake != nil {
		s.testHookRetake(id)
	}
	b := refRetry()
	for s.ctx.Err() == nil {
		l, err := s.sess.Current(s.ctx) // before the move lock: renewal takes it
		if err != nil {
			if errors.Is(err, ErrClosed) || !s.sleep(b.NextBackOff()) {
				return
			}
			continue
		}
		s.refs.move.Lock()
		s.refs.mu.Lock()
		settled := r.released || r.lost || r.key != key || r.gone == nil
		s.refs.mu.Unlock()
		if settled || l.Err() != nil {
			s.refs.move.Unlock()
			if settled {
				return // moved by a renewal, released or lost meanwhile
			}
			continue
		}
		_, err = s.putRef(s.ctx, l, id, r, false)
		switch {
		case err == nil:
			s.refs.move.Unlock()
			s.opt.logger.Info("reference taken again after its key was deleted", "id", id)
			return
		case errors.Is(err, core.ErrPackageNotExist):
			s.refLost(id, r, fmt.Errorf("its key was deleted and the package removed meanwhile: %w", err))
			s.refs.move.Unlock()
			return
		case errors.Is(err, ErrLeaseLost):
			s.refs.move.Unlock()
			// Revoked: putRef gave the lease up (Session.unknown); the
			// new lease's renewal takes r again.
			return
		}
		s.refs.move.Unlock()
		if !s.sleep(b.NextBackOff()) {
			return
		}
	}
}

// refRetry is the back-off of a reference's watch and retake: quick at
// first (a member moved), never giving up while the store is open.
func refRetry() *backoff.ExponentialBackOff {
	return backoff.NewExponentialBackOff(backoff.WithInitialInterval(50*time.Millisecond),
		backoff.WithMaxInterval(2*time.Second), backoff.WithMaxElapsedTime(0))
}

// sleep waits for d, or until the store closes (then it returns false).
func (s *Store) sleep(d time.Duration) bool { return sleepCtx(s.ctx, d) }

// sleepCtx waits d, or reports false when ctx ends first.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// newestCached returns the newest cached reference the store holds on id,
// lost or not, or nil. refs.mu must be held.
func (s *Store) newestCached(id string) *ref {
	rs := s.refs.held[id]
	for i := len(rs) - 1; i >= 0; i-- {
		if rs[i].cached {
			return rs[i]
		}
	}
	return nil
}

// RefProven reports whether the store holds a cached reference to id
// (IncRefCachedContext) whose key it knows to be in etcd now: its watch
// has not reported the key's deletion, and the key's lease is current and
// trusted. It does no I/O. A node grants a local reference from its cached
// one only while this holds; otherwise it asks ConfirmRefContext.
func (s *Store) RefProven(id string) bool { return s.proven(id, true) }

// proven is RefProven; without invalidWatch, a reference whose
// invalidation watch is down counts (for a caller that has just read that
// the package is valid).
func (s *Store) proven(id string, invalidWatch bool) bool {
	s.refs.mu.Lock()
	r := s.newestCached(id)
	ok := r != nil && !r.lost && r.gone == nil && !r.unwatched && r.invalid == nil && (!invalidWatch || !r.invalidUnwatched)
	var lease clientv3.LeaseID
	if ok {
		lease = r.lease
	}
	s.refs.mu.Unlock()
	return ok && s.sess.trusted(lease)
}

// RefInvalid reports whether the package of the store's newest cached
// reference to id was invalidated after the reference was taken (no I/O).
func (s *Store) RefInvalid(id string) bool {
	s.refs.mu.Lock()
	defer s.refs.mu.Unlock()
	r := s.newestCached(id)
	return r != nil && r.invalid != nil
}

// ConfirmRefContext makes sure the store's cached reference to id is in
// etcd now: it returns nil at once if RefProven holds; otherwise it waits
// for a reference being taken again (its key was deleted, or the lease is
// being renewed), or reads the key when its watch is down. It returns an
// error wrapping core.ErrPackageNotExist if the reference is lost (the
// package was removed), ErrNoRef if the store holds no cached reference to
// id, and etcd's error if it cannot tell within the operation timeout.
func (h *Handle) ConfirmRefContext(ctx context.Context) error {
	if h.err != nil {
		return h.fail("confirm reference", h.err)
	}
	s := h.s
	ctx, cancel := context.WithTimeout(ctx, 2*s.opt.opTimeout)
	defer cancel()
	for !s.RefProven(h.id) {
		s.refs.mu.Lock()
		r := s.newestCached(h.id)
		if r == nil {
			s.refs.mu.Unlock()
			return h.fail("confirm reference", ErrNoRef)
		}
		lost, gone, unwatched, key, lease := r.lost, r.gone, r.unwatched, r.key, r.lease
		invalid, invalidUnwatched := r.invalid, r.invalidUnwatched
		s.refs.mu.Unlock()
		switch {
		case invalid != nil:
			return h.fail("confirm reference", invalid.err(h.id))
		case invalidUnwatched:
			inv, err := s.invalidOf(ctx, h.id)
			switch {
			case err != nil:
				return h.fail("confirm reference", err)
			case inv != nil:
				return h.fail("confirm reference", inv.err(h.id))
			}
			if s.proven(h.id, false) {
				return nil // read just now: not invalid
			}
		case lost:
			return h.fail("confirm reference", fmt.Errorf("reference lost: %w", core.ErrPackageNotExist))
		case gone != nil:
			select {
			case <-gone:
			case <-ctx.Done():
				return h.fail("confirm reference", fmt.Errorf("waiting for the reference to be taken again: %w", ctx.Err()))
			}
		case !s.sess.trusted(lease):
			// Being renewed: Current returns once the new lease carries
			// every reference again.
			l, err := s.sess.Current(ctx)
			if err != nil {
				return h.fail("confirm reference", err)
			}
			if l.ID != lease {
				// Current, yet not the reference's lease: a moment's race
				// with the move; look again shortly.
				select {
				case <-time.After(5 * time.Millisecond):
				case <-ctx.Done():
				}
			}
		case unwatched:
			// A linearizable read proves the key now (a leader election
			// makes it wait, not fail).
			gctx, gcancel := context.WithTimeout(ctx, s.opt.opTimeout)
			resp, err := s.cli.Get(gctx, key, clientv3.WithCountOnly())
			gcancel()
			if err != nil {
				return h.fail("confirm reference", err)
			}
			if resp.Count == 1 {
				return nil
			}
			s.refDeleted(h.id, r, key, "its key is gone from etcd (read while its watch was down)")
		default:
			// Trusted lease, no deletion seen, watched: proven, unless the
			// reference changed between the two looks.
		}
		if ctx.Err() != nil {
			return h.fail("confirm reference", ctx.Err())
		}
	}
	return nil
}

// ReconcileRefs makes etcd's references on the store's current lease
// agree with the references the store holds: it deletes every reference
// key on the lease that the store does not track (a Txn that applied after
// its caller gave up on it), reporting each with a log line and
// EventRefDropped, and treats a tracked cached reference whose key is not
// on the lease as deleted behind its back (taken again, or lost). It
// returns how many keys it deleted. A node calls it at start, after a new
// lease, and periodically; the store also runs it after an IncRef whose
// outcome it could not read back.
func (s *Store) ReconcileRefs(ctx context.Context) (int, error) {
	l, err := s.sess.Current(ctx)
	if err != nil {
		return 0, fmt.Errorf("reconcile references: %w", err)
	}
	before, onLease, err := s.refsOnLease(ctx, l)
	if err != nil {
		return 0, fmt.Errorf("reconcile references: %w", err)
	}
	missing, strays := s.compareRefs(l, before, onLease)
	for _, x := range missing {
		s.refs.mu.Lock()
		key := x.r.key
		s.refs.mu.Unlock()
		s.refDeleted(x.id, x.r, key, "reconciliation found its key gone from etcd")
	}
	dropped, err := s.dropStrays(ctx, l, strays)
	if err != nil {
		return dropped, fmt.Errorf("reconcile references: %w", err)
	}
	return dropped, nil
}

// refsOnLease lists the reference keys attached to lease l, and the
// revision read just before the listing.
func (s *Store) refsOnLease(ctx context.Context, l *Lease) (before int64, onLease map[string]bool, err error) {
	// The revision before the listing: a key put at or before it is in
	// the listing unless it was deleted (a linearizable read, so the
	// listing that follows sees at least this revision).
	cctx, cancel := s.opCtx(ctx)
	rev, err := s.cli.Get(cctx, s.keys.Kind(keys.Ref), clientv3.WithCountOnly())
	cancel()
	if err != nil {
		return 0, nil, err
	}
	cctx, cancel = s.opCtx(ctx)
	resp, err := s.cli.TimeToLive(cctx, l.ID, clientv3.WithAttachedKeys())
	cancel()
	if err != nil {
		return 0, nil, fmt.Errorf("lease %s: %w", l.hex, err)
	}
	if resp.TTL <= 0 {
		return 0, nil, fmt.Errorf("%w: etcd no longer knows lease %s", ErrLeaseLost, l.hex)
	}
	pfx := s.keys.Kind(keys.Ref)
	onLease = make(map[string]bool, len(resp.Keys))
	for _, k := range resp.Keys {
		if ks := string(k); strings.HasPrefix(ks, pfx) {
			onLease[ks] = true
		}
	}
	return rev.Header.Revision, onLease, nil
}

// trackedRef is a reference the store holds, with its package.
type trackedRef struct {
	id string
	r  *ref
}

// compareRefs sets the store's references against onLease, the keys
// listed on lease l after revision before: missing are tracked cached
// references whose key the listing must have seen and did not; strays are
// keys on the lease the store does not track.
func (s *Store) compareRefs(l *Lease, before int64, onLease map[string]bool) (missing []trackedRef, strays []string) {
	// Snapshot after the listing: a key listed was pending before its Txn
	// was sent, so it is pending or held now, unless it was given up.
	s.refs.mu.Lock()
	defer s.refs.mu.Unlock()
	known := make(map[string]bool, len(s.refs.pending))
	for k := range s.refs.pending {
		known[k] = true
	}
	for id, rs := range s.refs.held {
		for _, r := range rs {
			known[r.key] = true
			// A key put after the listing is not in it: only one the
			// listing must have seen counts as missing.
			if r.cached && !r.lost && r.gone == nil && r.lease == l.ID && !onLease[r.key] && r.rev <= before {
				missing = append(missing, trackedRef{id, r})
			}
		}
	}
	for k := range onLease {
		if !known[k] {
			strays = append(strays, k)
		}
	}
	return missing, strays
}

// dropStrays deletes the stray reference keys from lease l, reporting
// each it deleted, and returns how many.
func (s *Store) dropStrays(ctx context.Context, l *Lease, strays []string) (int, error) {
	pfx := s.keys.Kind(keys.Ref)
	dropped := 0
	var errs []error
	for _, k := range strays {
		cctx, cancel := s.opCtx(ctx)
		// Only while the key is still on our lease: never another's.
		tr, err := s.cli.Txn(cctx).
			If(clientv3.Compare(clientv3.LeaseValue(k), "=", l.ID)).
			Then(clientv3.OpDelete(k)).
			Commit()
		cancel()
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !tr.Succeeded {
			continue
		}
		dropped++
		id, _, _ := strings.Cut(k[len(pfx):], "/")
		s.opt.logger.Warn("dropped a reference the store did not track (an IncRef whose outcome was lost)", "id", id, "key", k)
		s.emit(Event{Kind: EventRefDropped, ID: id, Host: s.opt.host, PID: s.pid})
	}
	return dropped, errors.Join(errs...)
}

// reconcileSoon runs ReconcileRefs once, after a delay in which a Txn
// whose outcome was lost has applied or failed, unless one is already due.
func (s *Store) reconcileSoon() {
	if !s.reconcileDue.CompareAndSwap(false, true) {
		return
	}
	s.spawn(func() {
		select {
		case <-s.ctx.Done():
			return
		case <-time.After(2 * s.opt.opTimeout):
		}
		s.reconcileDue.Store(false)
		ctx, cancel := context.WithTimeout(s.ctx, 2*s.opt.opTimeout)
		defer cancel()
		if _, err := s.ReconcileRefs(ctx); err != nil && s.ctx.Err() == nil {
			s.opt.logger.Warn("reconciling references failed; the next one will try again", "err", err)
		}
	})
}

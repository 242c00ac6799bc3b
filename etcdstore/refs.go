package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
)

// refTable is the references a Store holds, by package ID.
//
// Lock order: move before mu; mu is a leaf (nothing is called while it is
// held). move is held for reading while one reference is taken or released
// and for writing while references move to a new lease (every one, or one
// whose key etcd deleted behind our back), so a reference is never taken
// on a lease that is being replaced and missed by the move.
type refTable struct {
	move sync.RWMutex
	mu   sync.Mutex
	held map[string][]*ref // newest last
	// pending holds the keys of reference Txns in flight. A key is
	// pending from before its Txn is sent until it is in held or given
	// up, so ReconcileRefs never takes a key on its way in for a stray.
	pending map[string]struct{}
	seq     uint64
}

// ref is one reference held by this store. Its fields are guarded by
// refTable.mu.
type ref struct {
	key   string // current key; changes when the reference moves to a new lease
	since time.Time
	lost  bool // the package was gone when the reference was taken again
	// cached: taken by IncRefCachedContext; a removal asks for it, and the
	// store watches its key so that a node can prove it (RefProven).
	cached bool
	lease  clientv3.LeaseID // the lease key is on
	rev    int64            // revision at which key was known to exist (its put, or the read back)
	// pkg is the published record read in the Txn that took the
	// reference (nil when the Txn's outcome had to be read back).
	pkg *PackageRecord

	// released: DecRef gave it up (a deletion of its key is ours).
	released bool
	// gone is non-nil while etcd has deleted key behind our back (the
	// lease was revoked, or someone deleted the key) and the reference is
	// not yet taken again or found lost; it is closed when that is
	// settled.
	gone chan struct{}
	// unwatched: the key's watch failed and is being set up again; until
	// then a deletion could go unheard.
	unwatched bool
	// invalid is set once the package was invalidated after the reference
	// was taken (cached only: the store watches P/invalid/<id>); the
	// reference stays, but it is not proven any more: no new holder may be
	// granted the package from it.
	invalid *InvalidRecord
	// invalidUnwatched: the invalidation's watch failed and is being set
	// up again.
	invalidUnwatched bool
	stopWatch        context.CancelFunc // ends the key's watches (cached only)
	// holders, holdersAt and pods are what RecordHolders and RecordPods
	// last wrote into the record; a retake writes them again.
	holders   int
	holdersAt time.Time
	pods      []string
}

// settleLocked ends what follows r's current key: a wait for its retake
// (gone is closed) and its watch. refs.mu must be held.
func (r *ref) settleLocked() {
	if r.gone != nil {
		close(r.gone)
		r.gone = nil
	}
	if r.stopWatch != nil {
		r.stopWatch()
		r.stopWatch = nil
	}
}

// pop removes and returns the newest reference on id, or nil. The
// reference is marked released, so its key's deletion is not news.
func (t *refTable) pop(id string) *ref {
	t.mu.Lock()
	defer t.mu.Unlock()
	rs := t.held[id]
	if len(rs) == 0 {
		return nil
	}
	if len(rs) == 1 {
		delete(t.held, id)
	} else {
		t.held[id] = rs[:len(rs)-1]
	}
	r := rs[len(rs)-1]
	r.released = true
	r.settleLocked() // nobody waits for a retake of it
	return r
}

// newKey returns a fresh reference key of id on l, marked pending.
func (t *refTable) newKey(pfx string, l *Lease) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.seq++
	key := pfx + l.hex + "/" + strconv.FormatUint(t.seq, 10)
	t.pending[key] = struct{}{}
	return key
}

// IncRef is IncRefContext with a background context; each etcd call still
// has the store's deadline.
func (h *Handle) IncRef() error { return h.IncRefContext(context.Background()) }

// DecRef is DecRefContext with a background context.
func (h *Handle) DecRef() error { return h.DecRefContext(context.Background()) }

// IncRefContext takes a reference on the store's lease, in one Txn that
// succeeds only if the package is published: a reference never lands on a
// package that a concurrent removal has deleted. It updates the access time.
//
// If the package is being built (by this store or on any host), it waits
// for that attempt, as cipkg's IncRef waits for the package lock, and then
// takes the reference. It returns an error wrapping core.ErrPackageNotExist
// if the package is not available and no build is in progress, or the
// build it waited for failed or was abandoned. The reference lasts until
// DecRef, Close, or the loss of the lease (after which the store takes it
// again; see EventRefLost).
func (h *Handle) IncRefContext(ctx context.Context) error {
	if h.err != nil {
		return h.fail("incref", h.err)
	}
	return h.incRef(ctx, false)
}

// incRef is IncRefContext, for a plain or a cached reference.
func (h *Handle) incRef(ctx context.Context, cached bool) error {
	s := h.s
	waited := false
	for {
		r, building, err := s.incRef(ctx, h.id, cached)
		switch {
		case err == nil:
			return h.visible(ctx, r)
		case !errors.Is(err, core.ErrPackageNotExist), errors.Is(err, core.ErrInvalidated):
			return h.fail("incref", err)
		case waited || (building == nil && s.flying(h.id) == nil):
			return h.fail("incref", err)
		}
		// A build is in progress: wait for its end, then try once more.
		ended, err := s.awaitAttempt(ctx, h.id, building)
		if err != nil {
			return h.fail("incref", err)
		}
		waited = ended
	}
}

// visible returns once this host can see the package that r references
// (its view of the shared root may be stale); if it cannot within the
// visibility timeout, it releases the reference and says why.
func (h *Handle) visible(ctx context.Context, r *ref) error {
	h.s.refs.mu.Lock()
	rec := r.pkg
	h.s.refs.mu.Unlock()
	if rec == nil {
		st, err := h.s.readState(ctx, h.id)
		if err != nil || st.avail == nil {
			rec = &PackageRecord{} // check existence only
		} else {
			rec = st.avail
		}
	}
	if err := h.s.awaitVisible(ctx, h.id, rec); err != nil {
		h.DecRefContext(context.WithoutCancel(ctx)) //nolint:errcheck // retried in the background; the lease takes it anyway
		return h.fail("incref", err)
	}
	return nil
}

// incRef takes one reference. When the package is not available it
// returns core.ErrPackageNotExist and the revision and record of a build
// in progress, if any.
func (s *Store) incRef(ctx context.Context, id string, cached bool) (*ref, *attemptSeen, error) {
	for {
		l, err := s.sess.Current(ctx)
		if err != nil {
			return nil, nil, err
		}
		s.refs.move.RLock()
		if l.Err() != nil { // lost while we waited for the move lock
			s.refs.move.RUnlock()
			continue
		}
		r := &ref{since: time.Now(), cached: cached}
		building, err := s.putRef(ctx, l, id, r, true)
		s.refs.move.RUnlock()
		if errors.Is(err, ErrLeaseLost) && ctx.Err() == nil {
			continue // a new lease is on its way; take the reference on it
		}
		return r, building, err
	}
}

// attemptSeen is a running attempt as a read saw it.
type attemptSeen struct {
	rev int64 // revision of the read
	rec *BuildRecord
}

// putRef writes a new key for r on l if the package is available, and
// records it as r's key (and, with add, r as held on id) before the key
// stops being pending. If the package is not available, it returns
// core.ErrPackageNotExist and the attempt in progress, if any.
//
// An ambiguous outcome (the call failed; the Txn may have applied) is read
// back with a deadline of its own, whatever happened to ctx: a caller that
// gave up must not leave a key behind that the store does not know. If
// even the read-back fails, the key is deleted in the background, and a
// reconciliation is due (ReconcileRefs) for a Txn that applies later still.
func (s *Store) putRef(ctx context.Context, l *Lease, id string, r *ref, add bool) (building *attemptSeen, err error) {
	key := s.refs.newKey(s.keys.RefPrefix(id), l)
	defer func() {
		s.refs.mu.Lock()
		delete(s.refs.pending, key)
		s.refs.mu.Unlock()
		if err != nil && !errors.Is(err, core.ErrPackageNotExist) && !errors.Is(err, ErrLeaseLost) {
			s.deleteLater(key) // unknown outcome: make sure
			s.reconcileSoon()
		}
	}()
	s.refs.mu.Lock()
	rec := refRecord{Host: s.opt.host, PID: s.pid, Since: r.since, Purpose: s.opt.purpose, Cached: r.cached,
		Holders: r.holders, HoldersAt: r.holdersAt, Pods: r.pods}
	s.refs.mu.Unlock()
	val := mustJSON(rec)
	for attempt, republished := 0, 0; ; attempt++ {
		cctx, cancel := s.opCtx(ctx)
		txn, known := s.refTxn(cctx, id, key, val, l.ID, add)
		resp, err := txn.Commit()
		cancel()
		switch {
		case err == nil && resp.Succeeded:
			pkg := known.rec
			if pkg == nil {
				if kvs := resp.Responses[2].GetResponseRange().Kvs; len(kvs) == 1 {
					pkg = s.records.decode(id, kvs[0].ModRevision, kvs[0].Value)
				}
			}
			s.took(id, r, key, l.ID, pkg, resp.Header.Revision, add)
			return nil, nil
		case err == nil:
			if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) == 1 {
				if inv, derr := decode[InvalidRecord](kvs[0].Value); derr == nil {
					return nil, inv.err(id)
				}
			}
			// Published, but not the record the compare named (published
			// again since): remember the new one and try again.
			if kvs := resp.Responses[2].GetResponseRange().Kvs; len(kvs) == 1 && republished < 3 {
				republished++
				s.records.decode(id, kvs[0].ModRevision, kvs[0].Value)
				continue
			}
			return runningAttempt(resp), core.ErrPackageNotExist
		case errors.Is(err, rpctypes.ErrLeaseNotFound):
			return nil, s.sess.unknown(l, err)
		}
		// Ambiguous: the Txn may have applied. Read the key back, on a
		// context of our own: the caller's may be what ended the call.
		rctx, rcancel := s.opCtx(context.WithoutCancel(ctx))
		got, rerr := s.cli.Get(rctx, key)
		rcancel()
		if rerr == nil && len(got.Kvs) == 1 {
			s.took(id, r, key, l.ID, nil, got.Kvs[0].ModRevision, add)
			return nil, nil
		}
		if rerr == nil && attempt < 2 && ctx.Err() == nil {
			continue // it did not apply: try again
		}
		return nil, errors.Join(err, rerr)
	}
}

// refTxn builds, on ctx, the Txn that puts reference key (value val, on
// lease) on a published package id; with add, only if the package is not invalidated.
// It reports the published record it relies on, if the store knows it.
//
// When the store has seen the package's published record (recordMemo),
// the Txn compares the mod revision of the avail key with that record's
// and reads nothing back: a warm reference costs etcd no range read and
// the reply no record. Otherwise it asks only that the package be
// published and reads the record in the same Txn. Either way a failed
// Txn reads the build record, the invalidation and the avail key, in that
// order, to say why.
func (s *Store) refTxn(ctx context.Context, id, key, val string, lease clientv3.LeaseID, add bool) (clientv3.Txn, memoRecord) {
	avail := s.keys.AvailKey(id)
	known := s.records.known(id)
	// Only a published package can be referenced. TryRemove deletes the
	// avail key in the same Txn that checks for references, so the two
	// cannot both succeed. A mod revision names one publish for good.
	published := clientv3.Compare(clientv3.CreateRevision(avail), ">", 0)
	if known.rec != nil {
		published = clientv3.Compare(clientv3.ModRevision(avail), "=", known.rev)
	}
	cmps := []clientv3.Cmp{published}
	if add {
		// Nor an invalidated one (invalid.go): from the revision of its
		// invalidation on, no new reference. A reference taken again
		// (after its key was deleted, or on a new lease) is not new: its
		// holders keep an invalidated package until they leave.
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(s.keys.InvalidKey(id)), "=", 0))
	}
	then := []clientv3.Op{
		// The reference, on our lease: it dies with us.
		clientv3.OpPut(key, val, clientv3.WithLease(lease)),
		// The access time that pruning orders by.
		clientv3.OpPut(s.keys.ATimeKey(id), formatNanos(time.Now())),
	}
	if known.rec == nil {
		// What was published: this host checks it can see it.
		then = append(then, clientv3.OpGet(avail))
	}
	// Not referenced: is it being built (IncRef then waits), invalid, or
	// published anew?
	return s.cli.Txn(ctx).If(cmps...).Then(then...).
		Else(clientv3.OpGet(s.keys.BuildKey(id)), clientv3.OpGet(s.keys.InvalidKey(id)), clientv3.OpGet(avail)), known
}

// took records that r's reference on id is key on lease, put at revision
// rev, and, with add, that the store holds r; a cached reference's key is
// watched from rev on.
func (s *Store) took(id string, r *ref, key string, lease clientv3.LeaseID, pkg *PackageRecord, rev int64, add bool) {
	s.refs.mu.Lock()
	r.key, r.lease, r.pkg, r.rev = key, lease, pkg, rev
	if add {
		s.refs.held[id] = append(s.refs.held[id], r)
	}
	r.settleLocked() // a retake is done; the old key's watch ends
	r.unwatched = false
	var wctx context.Context
	if r.cached {
		wctx, r.stopWatch = context.WithCancel(clientv3.WithRequireLeader(s.ctx))
	}
	s.refs.mu.Unlock()
	if wctx != nil && (!s.spawn(func() { s.watchRef(wctx, id, r, key, rev) }) || !s.spawn(func() { s.watchInvalid(wctx, id, r, rev) })) {
		s.refs.mu.Lock()
		r.unwatched = true // closing: nothing is proven any more
		s.refs.mu.Unlock()
	}
}

// runningAttempt decodes the build record of a failed putRef Txn, if it
// names a running attempt.
func runningAttempt(resp *clientv3.TxnResponse) *attemptSeen {
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 {
		return nil
	}
	b, err := decode[BuildRecord](kvs[0].Value)
	if err != nil || b.State != BuildRunning {
		return nil
	}
	return &attemptSeen{rev: resp.Header.Revision, rec: b}
}

// DecRefContext releases the newest reference this store holds on the
// package. It is an error (ErrNoRef) if the store holds none. If etcd cannot
// be reached, the error says so and the key is deleted in the background
// (or with the lease).
func (h *Handle) DecRefContext(ctx context.Context) error {
	if h.err != nil {
		return h.fail("decref", h.err)
	}
	s := h.s
	s.refs.move.RLock()
	defer s.refs.move.RUnlock()
	r := s.refs.pop(h.id)
	if r == nil {
		return h.fail("decref", ErrNoRef)
	}
	if r.lost {
		return nil
	}
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	// Is the package invalid? Asked in the same Txn, as a compare (a
	// range read in a write Txn costs etcd more): the last holder to leave
	// removes it (invalid.go).
	valid := clientv3.Compare(clientv3.CreateRevision(s.keys.InvalidKey(h.id)), "=", 0)
	var resp *clientv3.TxnResponse
	var err error
	if r.cached {
		// A cached reference stands for its host's jobs: their last use is
		// now, as far as pruning is concerned (if the package is still
		// published). The failure branch says which compare failed.
		resp, err = s.cli.Txn(cctx).
			If(valid, clientv3.Compare(clientv3.CreateRevision(s.keys.AvailKey(h.id)), ">", 0)).
			Then(clientv3.OpDelete(r.key), clientv3.OpPut(s.keys.ATimeKey(h.id), formatNanos(time.Now()))).
			Else(clientv3.OpDelete(r.key), clientv3.OpGet(s.keys.InvalidKey(h.id), clientv3.WithCountOnly())).
			Commit()
	} else {
		resp, err = s.cli.Txn(cctx).If(valid).Then(clientv3.OpDelete(r.key)).Else(clientv3.OpDelete(r.key)).Commit()
	}
	if err != nil {
		s.deleteLater(r.key)
		return h.fail("decref", fmt.Errorf("%w (will keep trying in the background)", err))
	}
	if invalid := !resp.Succeeded && (!r.cached || resp.Responses[1].GetResponseRange().Count > 0); invalid {
		s.removeInvalid(ctx, h.id)
	}
	return nil
}

// retakeRefs moves every held reference onto the new lease l (the
// session's OnRenew). References whose package is gone are marked lost
// and reported with EventRefLost. Callers of IncRef/DecRef wait meanwhile.
func (s *Store) retakeRefs(ctx context.Context, l *Lease) {
	s.refs.move.Lock()
	defer s.refs.move.Unlock()
	type heldRef struct {
		id string
		r  *ref
	}
	var held []heldRef
	s.refs.mu.Lock()
	for id, rs := range s.refs.held {
		for _, r := range rs {
			if !r.lost {
				held = append(held, heldRef{id, r})
			}
		}
	}
	s.refs.mu.Unlock()
	for _, x := range held {
		_, err := s.putRef(ctx, l, x.id, x.r, false)
		if err == nil {
			continue
		}
		if !errors.Is(err, core.ErrPackageNotExist) {
			err = fmt.Errorf("take reference again: %w", err)
		}
		s.refLost(x.id, x.r, err)
	}
}

// refLost marks r, a reference on id that could not be taken again, as
// lost and reports it. The caller holds refs.move for writing.
func (s *Store) refLost(id string, r *ref, err error) {
	s.refs.mu.Lock()
	r.lost = true
	r.settleLocked()
	since := r.since
	s.refs.mu.Unlock()
	s.opt.logger.Warn("reference lost", "id", id, "err", err)
	s.emit(Event{Kind: EventRefLost, ID: id, Err: err, Host: s.opt.host, PID: s.pid, Since: since})
}

// HeldRefs returns how many references this store holds on id.
func (s *Store) HeldRefs(id string) int {
	s.refs.mu.Lock()
	defer s.refs.mu.Unlock()
	n := 0
	for _, r := range s.refs.held[id] {
		if !r.lost {
			n++
		}
	}
	return n
}

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
// and for writing while every reference moves to a new lease, so a
// reference is never taken on a lease that is being replaced and missed by
// the move.
type refTable struct {
	move sync.RWMutex
	mu   sync.Mutex
	held map[string][]*ref // newest last
	seq  uint64
}

// ref is one reference held by this store.
type ref struct {
	key   string // current key; changes when the reference moves to a new lease
	since time.Time
	lost  bool // the package was gone when the lease was renewed
	// cached: taken by IncRefCachedContext; a removal asks for it.
	cached bool
	lease  clientv3.LeaseID // the lease key is on
	// pkg is the published record read in the Txn that took the
	// reference (nil when the Txn's outcome had to be read back).
	pkg *PackageRecord
}

func (t *refTable) add(id string, r *ref) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.held[id] = append(t.held[id], r)
}

// pop removes and returns the newest reference on id, or nil.
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
	return rs[len(rs)-1]
}

func (t *refTable) nextSeq() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.seq++
	return t.seq
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
		case !errors.Is(err, core.ErrPackageNotExist):
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
	rec := r.pkg
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
		building, err := s.putRef(ctx, l, id, r)
		if err == nil {
			s.refs.add(id, r)
		}
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

// putRef writes r's key on l if the package is available. If it is not,
// it returns core.ErrPackageNotExist and the attempt in progress, if any.
func (s *Store) putRef(ctx context.Context, l *Lease, id string, r *ref) (*attemptSeen, error) {
	key := s.refPrefix(id) + l.hex + "/" + strconv.FormatUint(s.refs.nextSeq(), 10)
	now := time.Now()
	val := mustJSON(refRecord{Host: s.opt.host, PID: s.pid, Since: r.since, Purpose: s.opt.purpose, Cached: r.cached})
	for attempt := 0; ; attempt++ {
		cctx, cancel := s.opCtx(ctx)
		resp, err := s.cli.Txn(cctx).
			// Only a published package can be referenced. TryRemove deletes
			// this key in the same Txn that checks for references, so the
			// two cannot both succeed.
			If(clientv3.Compare(clientv3.CreateRevision(s.availKey(id)), ">", 0)).
			Then(
				// The reference, on our lease: it dies with us.
				clientv3.OpPut(key, val, clientv3.WithLease(l.ID)),
				// The access time that pruning orders by.
				clientv3.OpPut(s.atimeKey(id), formatNanos(now)),
				// What was published: this host checks it can see it.
				clientv3.OpGet(s.availKey(id))).
			// Not available: is it being built? (IncRef then waits.)
			Else(clientv3.OpGet(s.buildKey(id))).
			Commit()
		cancel()
		switch {
		case err == nil && resp.Succeeded:
			r.key, r.lease = key, l.ID
			if kvs := resp.Responses[2].GetResponseRange().Kvs; len(kvs) == 1 {
				r.pkg, _ = decode[PackageRecord](kvs[0].Value)
			}
			return nil, nil
		case err == nil:
			return runningAttempt(resp), core.ErrPackageNotExist
		case errors.Is(err, rpctypes.ErrLeaseNotFound):
			return nil, fmt.Errorf("%w: %v", ErrLeaseLost, err)
		}
		// Ambiguous: the Txn may have applied. Read the key back.
		rctx, rcancel := s.opCtx(ctx)
		got, rerr := s.cli.Get(rctx, key, clientv3.WithCountOnly())
		rcancel()
		if rerr == nil && got.Count == 1 {
			r.key, r.lease = key, l.ID
			return nil, nil
		}
		if rerr == nil && attempt < 2 && ctx.Err() == nil {
			continue // it did not apply: try again
		}
		return nil, errors.Join(err, rerr)
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
	var err error
	if r.cached {
		// A cached reference stands for its host's jobs: their last use is
		// now, as far as pruning is concerned.
		_, err = s.cli.Txn(cctx).
			If(clientv3.Compare(clientv3.CreateRevision(s.availKey(h.id)), ">", 0)).
			Then(clientv3.OpDelete(r.key), clientv3.OpPut(s.atimeKey(h.id), formatNanos(time.Now()))).
			Else(clientv3.OpDelete(r.key)).
			Commit()
	} else {
		_, err = s.cli.Delete(cctx, r.key)
	}
	if err != nil {
		s.deleteLater(r.key)
		return h.fail("decref", fmt.Errorf("%w (will keep trying in the background)", err))
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
		_, err := s.putRef(ctx, l, x.id, x.r)
		if err == nil {
			continue
		}
		s.refs.mu.Lock()
		x.r.lost = true
		s.refs.mu.Unlock()
		if !errors.Is(err, core.ErrPackageNotExist) {
			err = fmt.Errorf("take reference again: %w", err)
		}
		s.opt.logger.Warn("reference lost with the lease", "id", x.id, "err", err)
		s.emit(Event{Kind: EventRefLost, ID: x.id, Err: err, Host: s.opt.host, PID: s.pid, Since: x.r.since})
	}
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

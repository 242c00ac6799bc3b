package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
)

// Handle is one package of a Store. It holds no state of its own: references
// are counted by the Store per package ID, so two Handles of one ID are
// interchangeable.
type Handle struct {
	s   *Store
	id  string
	err error // from core.ValidateID
}

// ID returns the package ID.
func (h *Handle) ID() string { return h.id }

// OutputDirectory returns <root>/pkgs/<id>/contents, or "" for an invalid ID.
func (h *Handle) OutputDirectory() string {
	if h.err != nil {
		return ""
	}
	return h.s.outputDir(h.id)
}

// LoggingDirectory returns <root>/pkgs/<id>/logs, or "" for an invalid ID.
func (h *Handle) LoggingDirectory() string {
	if h.err != nil {
		return ""
	}
	return h.s.logDir(h.id)
}

func (h *Handle) fail(op string, err error) error {
	return fmt.Errorf("etcdstore: %s %q: %w", op, h.id, err)
}

// IncRef is IncRefContext with a background context; each etcd call still
// has the store's deadline.
func (h *Handle) IncRef() error { return h.IncRefContext(context.Background()) }

// DecRef is DecRefContext with a background context.
func (h *Handle) DecRef() error { return h.DecRefContext(context.Background()) }

// TryRemove is TryRemoveContext with a background context.
func (h *Handle) TryRemove() (bool, error) { return h.TryRemoveContext(context.Background()) }

// ref is one reference held by this store.
type ref struct {
	key   string // current key; changes when the reference moves to a new lease
	since time.Time
	lost  bool // the package was gone when the lease was renewed
}

// IncRefContext takes a reference on the store's lease, in one Txn that
// succeeds only if the package is published: a reference never lands on a
// package that a concurrent removal has deleted. It updates the access time.
// It returns an error wrapping core.ErrPackageNotExist if the package is not
// available. The reference lasts until DecRef, Close, or the loss of the
// lease (after which the store takes it again; see EventRefLost).
func (h *Handle) IncRefContext(ctx context.Context) error {
	if h.err != nil {
		return h.fail("incref", h.err)
	}
	s := h.s
	for {
		ss, err := s.session(ctx)
		if err != nil {
			return h.fail("incref", err)
		}
		s.refMu.RLock()
		if ss.ctx.Err() != nil { // lost while we waited for refMu
			s.refMu.RUnlock()
			continue
		}
		r := &ref{since: time.Now()}
		err = s.putRef(ctx, ss, h.id, r)
		if err == nil {
			s.mu.Lock()
			s.refs[h.id] = append(s.refs[h.id], r)
			s.mu.Unlock()
		}
		s.refMu.RUnlock()
		if errors.Is(err, ErrLeaseLost) && ctx.Err() == nil {
			continue // a new lease is on its way; take the reference on it
		}
		if err != nil {
			return h.fail("incref", err)
		}
		return nil
	}
}

// putRef writes r's key on ss's lease if the package is available.
func (s *Store) putRef(ctx context.Context, ss *session, id string, r *ref) error {
	s.mu.Lock()
	s.refSeq++
	key := s.refPrefix(id) + ss.hex + "/" + strconv.FormatUint(s.refSeq, 10)
	s.mu.Unlock()
	now := time.Now()
	val := mustJSON(refRecord{Host: s.opt.host, PID: s.pid, Since: r.since, Purpose: s.opt.purpose})
	for attempt := 0; ; attempt++ {
		cctx, cancel := s.opCtx(ctx)
		resp, err := s.cli.Txn(cctx).
			// Only a published package can be referenced. TryRemove deletes
			// this key in the same Txn that checks for references, so the
			// two cannot both succeed.
			If(clientv3.Compare(clientv3.CreateRevision(s.availKey(id)), ">", 0)).
			Then(
				// The reference, on our lease: it dies with us.
				clientv3.OpPut(key, val, clientv3.WithLease(ss.id)),
				// The access time that pruning orders by.
				clientv3.OpPut(s.atimeKey(id), formatNanos(now))).
			Commit()
		cancel()
		switch {
		case err == nil && resp.Succeeded:
			r.key = key
			return nil
		case err == nil:
			return core.ErrPackageNotExist
		case errors.Is(err, rpctypes.ErrLeaseNotFound):
			return fmt.Errorf("%w: %v", ErrLeaseLost, err)
		}
		// Ambiguous: the Txn may have applied. Read the key back.
		rctx, rcancel := s.opCtx(ctx)
		got, rerr := s.cli.Get(rctx, key, clientv3.WithCountOnly())
		rcancel()
		if rerr == nil && got.Count == 1 {
			r.key = key
			return nil
		}
		if rerr == nil && attempt < 2 && ctx.Err() == nil {
			continue // it did not apply: try again
		}
		return errors.Join(err, rerr)
	}
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
	s.refMu.RLock()
	defer s.refMu.RUnlock()
	s.mu.Lock()
	rs := s.refs[h.id]
	if len(rs) == 0 {
		s.mu.Unlock()
		return h.fail("decref", ErrNoRef)
	}
	r := rs[len(rs)-1]
	if len(rs) == 1 {
		delete(s.refs, h.id)
	} else {
		s.refs[h.id] = rs[:len(rs)-1]
	}
	s.mu.Unlock()
	if r.lost {
		return nil
	}
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	if _, err := s.cli.Delete(cctx, r.key); err != nil {
		s.deleteLater(r.key)
		return h.fail("decref", fmt.Errorf("%w (will keep trying in the background)", err))
	}
	return nil
}

// retakeRefs moves every held reference onto the new lease ss. References
// whose package is gone are marked lost and reported with EventRefLost.
// Callers of IncRef/DecRef wait meanwhile (refMu).
func (s *Store) retakeRefs(ss *session) {
	s.refMu.Lock()
	defer s.refMu.Unlock()
	s.mu.Lock()
	var held []struct {
		id string
		r  *ref
	}
	for id, rs := range s.refs {
		for _, r := range rs {
			if !r.lost {
				held = append(held, struct {
					id string
					r  *ref
				}{id, r})
			}
		}
	}
	s.mu.Unlock()
	for _, x := range held {
		err := s.putRef(s.ctx, ss, x.id, x.r)
		if err == nil {
			continue
		}
		x.r.lost = true
		if !errors.Is(err, core.ErrPackageNotExist) {
			err = fmt.Errorf("take reference again: %w", err)
		}
		s.opt.logger.Warn("reference lost with the lease", "id", x.id, "err", err)
		s.emit(Event{Kind: EventRefLost, ID: x.id, Err: err, Host: s.opt.host, PID: s.pid, Since: x.r.since})
	}
}

// HeldRefs returns how many references this store holds on id.
func (s *Store) HeldRefs(id string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, r := range s.refs[id] {
		if !r.lost {
			n++
		}
	}
	return n
}

// TryRemoveContext removes the package if no reference holds it and no
// build or removal holds its lock: TryLock, then one Txn that deletes the
// package's keys only if it is published and has no reference, then a
// rename of its directory into the trash. It reports (false, nil) when the
// package is in use and an error wrapping core.ErrPackageNotExist when it is
// not available.
func (h *Handle) TryRemoveContext(ctx context.Context) (bool, error) {
	if h.err != nil {
		return false, h.fail("remove", h.err)
	}
	ok, err := h.s.tryRemove(ctx, h.id, 0)
	if err != nil {
		return false, h.fail("remove", err)
	}
	return ok, nil
}

// tryRemove is TryRemove; a non-zero atimeRev also requires that the access
// time was not touched since it was read (Prune's guard against removing a
// package used after it was listed).
func (s *Store) tryRemove(ctx context.Context, id string, atimeRev int64) (bool, error) {
	unlock, ok := s.tryLockLocal(id)
	if !ok {
		return false, nil // a build or removal of ours is in progress
	}
	defer unlock()
	ss, err := s.session(ctx)
	if err != nil {
		return false, err
	}
	l := s.newLock(ss, s.lockPrefix(id))
	if ok, err := l.tryLock(ctx); !ok || err != nil {
		return false, err
	}
	defer l.release()

	cmps := []clientv3.Cmp{
		// It is published (a missing package is ErrPackageNotExist).
		clientv3.Compare(clientv3.CreateRevision(s.availKey(id)), ">", 0),
		// No reference exists, on any lease. IncRef checks avail in its own
		// Txn, so a reference either lands before this (and we fail) or
		// after (and it fails).
		clientv3.Compare(clientv3.CreateRevision(s.refPrefix(id)), "=", 0).WithPrefix(),
		// We still hold the lock: no build started behind our back.
		l.isOwner(),
	}
	if atimeRev > 0 {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(s.atimeKey(id)), "=", atimeRev))
	}
	cctx, cancel := s.opCtx(ctx)
	resp, err := s.cli.Txn(cctx).If(cmps...).
		Then(clientv3.OpDelete(s.availKey(id)), clientv3.OpDelete(s.atimeKey(id))).
		Else(clientv3.OpGet(s.availKey(id), clientv3.WithCountOnly())).
		Commit()
	cancel()
	if err != nil {
		// Ambiguous. We hold the lock, so only our Txn can have deleted
		// avail: read it back.
		rctx, rcancel := s.opCtx(ctx)
		got, rerr := s.cli.Get(rctx, s.availKey(id), clientv3.WithCountOnly())
		rcancel()
		if rerr != nil || got.Count != 0 {
			return false, errors.Join(err, rerr)
		}
	} else if !resp.Succeeded {
		if resp.Responses[0].GetResponseRange().Count == 0 {
			return false, core.ErrPackageNotExist
		}
		return false, nil // referenced, touched, or our lock is gone
	}
	// The package is gone from etcd; nothing can reference it any more.
	// Move the tree aside while we still hold the lock, so a new build
	// cannot start in it meanwhile.
	if err := s.moveToTrash(s.pkgDir(id)); err != nil {
		s.opt.logger.Warn("package removed but its tree stays until the next prune", "id", id, "err", err)
	}
	s.emit(Event{Kind: EventRemoved, ID: id})
	return true, nil
}

package etcdstore

import (
	"context"
	"errors"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
)

// TryRemove is TryRemoveContext with a background context.
func (h *Handle) TryRemove() (bool, error) { return h.TryRemoveContext(context.Background()) }

// TryRemoveContext removes the package if no reference holds it and no
// build or removal holds its lock: take the lock without waiting, then one
// Txn that deletes the package's keys only if it is published and has no
// reference, then a rename of its directory into the trash. It reports
// (false, nil) when the package is in use and an error wrapping
// core.ErrPackageNotExist when it is not available.
func (h *Handle) TryRemoveContext(ctx context.Context) (bool, error) {
	if h.err != nil {
		return false, h.fail("remove", h.err)
	}
	ok, err := h.s.tryRemove(ctx, h.id, 0, true)
	if err != nil {
		return false, h.fail("remove", err)
	}
	return ok, nil
}

// lockIdle takes the package's lock only if nobody holds it, in this store
// or anywhere else: the prelude of every step that changes a package
// without building it (removal, the orphan sweep). It returns a nil lock
// when the package is busy; otherwise the caller must call unlock.
func (s *Store) lockIdle(ctx context.Context, id string) (l *lock, unlock func(), err error) {
	unlockLocal, ok := s.tryLockLocal(id)
	if !ok {
		return nil, nil, nil // a build or removal of ours is in progress
	}
	ls, err := s.sess.Current(ctx)
	if err != nil {
		unlockLocal()
		return nil, nil, err
	}
	l = s.newLock(ls, s.keys.LockPrefix(id))
	if ok, err := l.tryLock(ctx); !ok || err != nil {
		unlockLocal()
		return nil, nil, err
	}
	return l, func() { l.release(); unlockLocal() }, nil
}

// tryRemove is TryRemove; a non-zero atimeRev also requires that the access
// time was not touched since it was read (Prune's guard against removing a
// package used after it was listed). With yield, a package that only
// nodes' cached references hold is asked for (yield.go); Prune does not
// ask: a lingering package was used within its node's linger.
func (s *Store) tryRemove(ctx context.Context, id string, atimeRev int64, yield bool) (bool, error) {
	l, unlock, err := s.lockIdle(ctx, id)
	if l == nil {
		return false, err
	}
	defer unlock()

	removed, err := s.removeTxn(ctx, l, id, atimeRev)
	if err == nil && !removed && yield && s.askYield(ctx, l.sess, id) {
		// Only cached references held it, and their owners let go.
		removed, err = s.removeTxn(ctx, l, id, atimeRev)
	}
	if !removed || err != nil {
		return false, err
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

// removeTxn deletes id's keys in one Txn if it is published, unreferenced,
// needed by no published package, unpinned, still locked by l and (for a
// non-zero atimeRev) untouched. It reports (false, nil) when the package is
// in use and core.ErrPackageNotExist when it is not available.
func (s *Store) removeTxn(ctx context.Context, l *lock, id string, atimeRev int64) (bool, error) {
	// Under the lock the published record cannot change (publishing takes
	// the lock), so its needs, read here, are the edges to delete.
	st, err := s.readState(ctx, id)
	if err != nil {
		return false, err
	}
	if st.avail == nil {
		return false, core.ErrPackageNotExist
	}
	if unpinned, err := s.pinGone(ctx, id, st); err != nil || !unpinned {
		return false, err // pinned
	}
	cmps := []clientv3.Cmp{
		// It is published, as read (a missing package is ErrPackageNotExist).
		clientv3.Compare(clientv3.ModRevision(s.keys.AvailKey(id)), "=", st.availRev),
		// No reference exists, on any lease. IncRef checks avail in its own
		// Txn, so a reference either lands before this (and we fail) or
		// after (and it fails).
		clientv3.Compare(clientv3.CreateRevision(s.keys.RefPrefix(id)), "=", 0).WithPrefix(),
		// No published package needs it: a reference on a dependent
		// protects it through this edge (needs.go). A dependent's publish
		// checks avail in its own Txn, as IncRef does.
		clientv3.Compare(clientv3.CreateRevision(s.keys.NeededBy(id)), "=", 0).WithPrefix(),
		// Not pinned (pins.go); a pin put after our read fails us here.
		clientv3.Compare(clientv3.CreateRevision(s.keys.PinKey(id)), "=", 0),
		// We still hold the lock: no build started behind our back.
		l.isOwner(),
	}
	if atimeRev > 0 {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(s.keys.ATimeKey(id)), "=", atimeRev))
	}
	ops := []clientv3.Op{clientv3.OpDelete(s.keys.AvailKey(id)), clientv3.OpDelete(s.keys.ATimeKey(id))}
	for _, n := range st.avail.Needs {
		ops = append(ops, clientv3.OpDelete(s.keys.NeedKey(n, id))) // our edges go with us
	}
	inv, lease, err := s.removedInvalidOps(ctx, id, st.invalid)
	if err != nil {
		return false, err
	}
	ops = append(ops, inv...)
	removed, err := s.commitRemoval(ctx, id, cmps, ops)
	if !removed && lease != 0 {
		// The record's lease was granted for nothing: a sweeper tries an
		// invalid package that is still held again and again, and each
		// lease would live for the whole retention.
		s.revoke(ctx, lease)
	}
	return removed, err
}

// commitRemoval is removeTxn's Txn; an ambiguous outcome is read back.
func (s *Store) commitRemoval(ctx context.Context, id string, cmps []clientv3.Cmp, ops []clientv3.Op) (bool, error) {
	cctx, cancel := s.opCtx(ctx)
	resp, err := s.cli.Txn(cctx).If(cmps...).Then(ops...).Commit()
	cancel()
	if err != nil {
		// Ambiguous. We hold the lock, so only our Txn can have deleted
		// avail: read it back.
		rctx, rcancel := s.opCtx(ctx)
		got, rerr := s.cli.Get(rctx, s.keys.AvailKey(id), clientv3.WithCountOnly())
		rcancel()
		if rerr != nil || got.Count != 0 {
			return false, errors.Join(err, rerr)
		}
	} else if !resp.Succeeded {
		return false, nil // referenced, needed, pinned, touched, or our lock is gone
	}
	return true, nil
}

// revoke ends a lease this store granted and no longer needs; a failure is
// only logged (it expires).
func (s *Store) revoke(ctx context.Context, lease clientv3.LeaseID) {
	cctx, cancel := s.opCtx(context.WithoutCancel(ctx))
	defer cancel()
	if _, err := s.cli.Revoke(cctx, lease); err != nil {
		s.opt.logger.Debug("revoking an unused lease failed; it expires", "lease", fmt.Sprintf("%x", int64(lease)), "err", err)
	}
}

// sweepOrphan moves an orphan directory aside while holding the package's
// lock and after checking, under it, that the package is still absent.
func (s *Store) sweepOrphan(ctx context.Context, id string, dryRun bool) (bool, error) {
	l, unlock, err := s.lockIdle(ctx, id)
	if l == nil {
		return false, err
	}
	defer unlock()
	st, err := s.readState(ctx, id)
	if err != nil || st.avail != nil || st.build != nil {
		return false, err
	}
	if dryRun {
		return true, nil
	}
	return true, s.moveToTrash(s.pkgDir(id))
}

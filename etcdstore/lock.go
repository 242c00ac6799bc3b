package etcdstore

import (
	"context"
	"errors"
	"fmt"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// lock is a package's cluster-wide lock. It uses the key layout of etcd's
// concurrency.Mutex (pfx/<lease-hex>, owner = smallest create revision,
// each waiter watching only its predecessor) but is written here so that
// every call has its own deadline, an ambiguous first Txn is retried on the
// same key instead of leaving a ghost waiter, a cancelled wait always
// deletes its key (in the background if etcd is away), and a wait ends as
// soon as our own lease is in doubt (etcd #18082, #19597).
type lock struct {
	s    *Store
	sess *Lease
	pfx  string
	key  string
	rev  int64 // create revision of key: the fencing token of this holder
	// gone is set once our key is known deleted (released, or deleted by a
	// Txn that succeeded), so release does nothing more.
	gone bool
	// queued is set when lock had to wait for a predecessor.
	queued bool
}

func (s *Store) newLock(ss *Lease, pfx string) *lock {
	return &lock{s: s, sess: ss, pfx: pfx, key: pfx + ss.hex}
}

// enqueue puts our key in the queue (or finds it there) and reports whether
// we are first.
func (l *lock) enqueue(ctx context.Context) (first bool, err error) {
	s := l.s
	for attempt := 0; ; attempt++ {
		cctx, cancel := s.opCtx(ctx)
		resp, err := s.cli.Txn(cctx).
			// Our key is new: create it on our lease...
			If(clientv3.Compare(clientv3.CreateRevision(l.key), "=", 0)).
			Then(
				clientv3.OpPut(l.key, s.holderValue(), clientv3.WithLease(l.sess.ID)), // who queues: for watchers
				clientv3.OpGet(l.pfx, clientv3.WithFirstCreate()...)).
			// ...or an earlier, ambiguous attempt of ours made it: adopt it.
			Else(
				clientv3.OpGet(l.key),
				clientv3.OpGet(l.pfx, clientv3.WithFirstCreate()...)).
			Commit()
		cancel()
		if err != nil {
			if errors.Is(err, rpctypes.ErrLeaseNotFound) {
				return false, s.sess.unknown(l.sess, err)
			}
			// The Put may have applied; the retry adopts it. Give up only
			// when the caller does or after a few rounds.
			if ctx.Err() != nil || attempt >= 2 {
				l.release()
				return false, err
			}
			continue
		}
		if resp.Succeeded {
			l.rev = resp.Header.Revision
		} else {
			l.rev = resp.Responses[0].GetResponseRange().Kvs[0].CreateRevision
		}
		owner := resp.Responses[1].GetResponseRange().Kvs
		return len(owner) == 0 || owner[0].CreateRevision == l.rev, nil
	}
}

// lock blocks until we own the lock, ctx ends, or our lease is in doubt. On
// error our key is gone (or going).
func (l *lock) lock(ctx context.Context) error {
	ctx, stop := mergeCancel(ctx, l.sess.ctx)
	defer stop()
	first, err := l.enqueue(ctx)
	if err != nil {
		return err
	}
	if first {
		return nil
	}
	l.queued = true
	if err := l.waitPredecessors(ctx); err != nil {
		l.release()
		if cause := context.Cause(ctx); cause != nil && ctx.Err() != nil {
			return cause
		}
		return err
	}
	return nil
}

// tryLock takes the lock if it is free, never waiting for it.
func (l *lock) tryLock(ctx context.Context) (bool, error) {
	first, err := l.enqueue(ctx)
	if err != nil || first {
		return first, err
	}
	l.release()
	return false, nil
}

// waitPredecessors waits until no key older than ours is left.
func (l *lock) waitPredecessors(ctx context.Context) error {
	s := l.s
	for {
		cctx, cancel := s.opCtx(ctx)
		// Read-only Txn: no Raft write.
		resp, err := s.cli.Txn(cctx).Then(
			clientv3.OpGet(l.pfx, append(clientv3.WithLastCreate(), clientv3.WithMaxCreateRev(l.rev-1))...),
			clientv3.OpGet(l.key, clientv3.WithCountOnly()),
		).Commit()
		cancel()
		if err != nil {
			return err
		}
		if resp.Responses[1].GetResponseRange().Count == 0 {
			return fmt.Errorf("%w: lock key %s vanished while waiting", ErrLeaseLost, l.key)
		}
		pred := resp.Responses[0].GetResponseRange().Kvs
		if len(pred) == 0 {
			return nil
		}
		if err := s.waitDelete(ctx, string(pred[0].Key), resp.Header.Revision+1); err != nil {
			return err
		}
	}
}

// waitDelete returns when key is deleted at or after rev. A watch error
// (compaction, lost leader) returns nil too: the caller re-reads.
func (s *Store) waitDelete(ctx context.Context, key string, rev int64) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	for wr := range s.cli.Watch(wctx, key, clientv3.WithRev(rev)) {
		if wr.Err() != nil {
			return nil
		}
		for _, ev := range wr.Events {
			if ev.Type == clientv3.EventTypeDelete {
				return nil
			}
		}
	}
	return ctx.Err()
}

// isOwner is the Txn compare that holds only while we own the lock: our key
// still exists with the create revision we got.
func (l *lock) isOwner() clientv3.Cmp {
	return clientv3.Compare(clientv3.CreateRevision(l.key), "=", l.rev)
}

// releaseOp deletes our key inside another Txn (publish, failure); the
// caller sets gone when that Txn succeeded.
func (l *lock) releaseOp() clientv3.Op { return clientv3.OpDelete(l.key) }

// release deletes our key with a fresh deadline, finishing in the
// background if etcd cannot be reached now. Safe to call twice.
func (l *lock) release() {
	if l.gone {
		return
	}
	l.gone = true
	ctx, cancel := l.s.opCtx(context.Background())
	defer cancel()
	if _, err := l.s.cli.Delete(ctx, l.key); err != nil {
		l.s.deleteLater(l.key)
	}
}

// mergeCancel returns a context that ends when ctx ends or when other does,
// carrying other's cause.
func mergeCancel(ctx, other context.Context) (context.Context, context.CancelFunc) {
	mctx, cancel := context.WithCancelCause(ctx)
	stop := context.AfterFunc(other, func() { cancel(context.Cause(other)) })
	return mctx, func() { stop(); cancel(context.Canceled) }
}

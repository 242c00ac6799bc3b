package etcdstore

import (
	"context"
	"time"

	"github.com/cenkalti/backoff/v4"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Cached references and yield requests.
//
// A node keeps one etcd reference per package for all the jobs on its host
// and keeps it for a while after the last one ends (its linger), so that
// the next job costs etcd nothing. Such a reference is a cache: nobody uses
// the package through it while no local job holds it. It is taken with
// IncRefCachedContext and marked so in its record. A removal that finds
// only cached references does not fail at once: it puts P/yield/<id> (on
// its lease), and every store that holds cached references watches
// P/yield/ and reports the request as EventYieldRequested; its owner
// releases the reference if no job holds it. The removal waits (at most
// the store's yield wait) until the references are gone, then checks again
// in the same Txn as always, so atomicity against IncRef is unchanged: a
// job that takes the package meanwhile keeps it.

// yieldKey is the key a removal puts to ask cached references to go.
func (s *Store) yieldKey(id string) string { return s.key("yield", id) }

// IncRefCachedContext is IncRefContext for a reference that its owner keeps
// only as a cache for local users (a node's host reference while no job
// holds the package): the reference record says so, a removal on any host
// that finds only cached references asks their owners to let go and waits
// for them (see EventYieldRequested), and its release also records the
// access time, which a cached reference stands for while it is held. The
// first cached reference starts the store's watch of yield requests.
func (h *Handle) IncRefCachedContext(ctx context.Context) error {
	if h.err != nil {
		return h.fail("incref", h.err)
	}
	h.s.yieldWatch.Do(func() { h.s.spawn(h.s.watchYield) })
	return h.incRef(ctx, true)
}

// watchYield reports every yield request as EventYieldRequested until the
// store closes. A request missed while the watch restarts only makes its
// removal wait its bound and report the package in use.
func (s *Store) watchYield() {
	pfx := s.key("yield", "")
	b := backoff.NewExponentialBackOff()
	b.MaxInterval = 5 * time.Second
	b.MaxElapsedTime = 0
	for s.ctx.Err() == nil {
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(s.ctx))
		for wr := range s.cli.Watch(wctx, pfx, clientv3.WithPrefix(), clientv3.WithFilterDelete()) {
			if wr.Err() != nil {
				break
			}
			b.Reset()
			for _, ev := range wr.Events {
				s.emit(Event{Kind: EventYieldRequested, ID: string(ev.Kv.Key[len(pfx):]), Host: string(ev.Kv.Value)})
			}
		}
		cancel()
		select {
		case <-s.ctx.Done():
		case <-time.After(b.NextBackOff()):
		}
	}
}

// askYield is a removal's answer to finding references: if every one of
// them is cached, it asks their owners to let go and waits until they are
// gone, for at most the store's yield wait. It reports whether the
// removal should check again (some references went, or all of them).
func (s *Store) askYield(ctx context.Context, l *Lease, id string) bool {
	if s.opt.yieldWait <= 0 {
		return false
	}
	cctx, cancel := s.opCtx(ctx)
	resp, err := s.cli.Get(cctx, s.refPrefix(id), clientv3.WithPrefix())
	cancel()
	if err != nil || len(resp.Kvs) == 0 {
		return err == nil // gone meanwhile: check again
	}
	left := map[string]bool{}
	for _, kv := range resp.Kvs {
		r, err := decode[refRecord](kv.Value)
		if err != nil || !r.Cached {
			return false // a job holds it: in use
		}
		left[string(kv.Key)] = true
	}
	wctx, wcancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), s.opt.yieldWait)
	defer wcancel()
	// Watch first, then ask: no release is missed.
	wch := s.cli.Watch(wctx, s.refPrefix(id), clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	pctx, pcancel := s.opCtx(ctx)
	_, err = s.cli.Put(pctx, s.yieldKey(id), s.opt.host, clientv3.WithLease(l.ID))
	pcancel()
	if err != nil {
		return false
	}
	defer s.deleteYield(id)
	for wr := range wch {
		for _, ev := range wr.Events {
			if ev.Type == clientv3.EventTypeDelete {
				delete(left, string(ev.Kv.Key))
				continue
			}
			if r, err := decode[refRecord](ev.Kv.Value); err != nil || !r.Cached {
				return false // a job took it meanwhile
			}
			left[string(ev.Kv.Key)] = true
		}
		if len(left) == 0 {
			return true
		}
		if wr.Err() != nil {
			break
		}
	}
	return false
}

// deleteYield withdraws a removal's request (it also goes with the lease).
func (s *Store) deleteYield(id string) {
	ctx, cancel := s.opCtx(context.Background())
	defer cancel()
	if _, err := s.cli.Delete(ctx, s.yieldKey(id)); err != nil {
		s.deleteLater(s.yieldKey(id))
	}
}

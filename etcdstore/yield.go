package etcdstore

import (
	"context"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/internal/keys"
)

// Cached references and yield requests.
//
// A node keeps one etcd reference per package for all the jobs on its host
// and keeps it for a while after the last one ends (its linger), so that
// the next job costs etcd nothing. Such a reference is a cache: nobody uses
// the package through it while no local job holds it. It is taken with
// IncRefCachedContext and marked so in its record. A removal that finds
// only cached references does not fail at once: it puts P/ask/yield/<id>
// (on its lease), and every store that holds cached references watches
// P/ask/ and reports the request as EventYieldRequested; its owner
// releases the reference if no job holds it. The removal waits (at most
// the store's yield wait) until the references are gone, then checks again
// in the same Txn as always, so atomicity against IncRef is unchanged: a
// job that takes the package meanwhile keeps it.
//
// The same watch carries P/ask/holders/<id>: AskHolders on another host
// wants to know how many local jobs hold the package through each cached
// reference; the owner writes the count into its reference's record
// (RecordHolders), and the asker reads it back (holders.go).

// Requests, under P/ask/<kind>/<id>.
const (
	askYield   = "yield"
	askHolders = "holders"
)

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
	h.s.askWatch.Do(func() { h.s.spawn(h.s.watchAsk) })
	return h.incRef(ctx, true)
}

// watchAsk reports every request as EventYieldRequested or
// EventHoldersRequested until the store closes. A request missed while the
// watch restarts only makes its asker wait its bound (a removal then
// reports the package in use).
func (s *Store) watchAsk() {
	pfx := s.keys.Kind(keys.Ask)
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
				kind, id, _ := strings.Cut(string(ev.Kv.Key[len(pfx):]), "/")
				e := Event{ID: id, Host: string(ev.Kv.Value)}
				switch kind {
				case askYield:
					e.Kind = EventYieldRequested
				case askHolders:
					e.Kind = EventHoldersRequested
				default:
					continue
				}
				s.emit(e)
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
// removal should check again (all of them went).
func (s *Store) askYield(ctx context.Context, l *Lease, id string) bool {
	if s.opt.yieldWait <= 0 {
		return false
	}
	cctx, cancel := s.opCtx(ctx)
	resp, err := s.cli.Get(cctx, s.keys.RefPrefix(id), clientv3.WithPrefix())
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
	refused := false
	done, err := s.ask(ctx, l, askYield, id, resp.Header.Revision, s.opt.yieldWait, func(ev *clientv3.Event) bool {
		if ev.Type == clientv3.EventTypeDelete {
			delete(left, string(ev.Kv.Key))
			return len(left) == 0
		}
		if r, err := decode[refRecord](ev.Kv.Value); err != nil || !r.Cached || r.Holders > 0 {
			// A job took it meanwhile, or the owner answered that jobs
			// on its host hold it (its holder count).
			refused = true
			return true
		}
		left[string(ev.Kv.Key)] = true
		return false
	})
	return err == nil && done && !refused
}

// ask puts the request kind about id (on lease l), feeds every change of
// id's references after revision rev to answered until it reports the
// answer complete or wait passes, and withdraws the request. It reports
// whether answered did.
func (s *Store) ask(ctx context.Context, l *Lease, kind, id string, rev int64, wait time.Duration, answered func(*clientv3.Event) bool) (bool, error) {
	wctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), wait)
	defer cancel()
	// Watch first, then ask: no answer is missed.
	wch := s.cli.Watch(wctx, s.keys.RefPrefix(id), clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	pctx, pcancel := s.opCtx(ctx)
	_, err := s.cli.Put(pctx, s.keys.AskKey(kind, id), s.opt.host, clientv3.WithLease(l.ID))
	pcancel()
	if err != nil {
		return false, err
	}
	defer s.deleteAsk(kind, id)
	for wr := range wch {
		for _, ev := range wr.Events {
			if answered(ev) {
				return true, nil
			}
		}
		if wr.Err() != nil {
			break
		}
	}
	return false, nil
}

// deleteAsk withdraws a request (it also goes with the asker's lease).
func (s *Store) deleteAsk(kind, id string) {
	ctx, cancel := s.opCtx(context.Background())
	defer cancel()
	if _, err := s.cli.Delete(ctx, s.keys.AskKey(kind, id)); err != nil {
		s.deleteLater(s.keys.AskKey(kind, id))
	}
}

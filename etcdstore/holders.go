package etcdstore

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
)

// DefaultHoldersWait bounds how long AskHolders waits for the nodes'
// answers.
const DefaultHoldersWait = time.Second

// AskHolders is Inspect for another host's view of nodes: if cached
// references (a node's host references, IncRefCachedContext) hold id, it
// asks their owners how many local jobs hold the package through them,
// waits up to wait for the answers (each owner writes its count into its
// reference's record: RefInfo.Holders at RefInfo.HoldersAt), and then
// inspects. A node that does not answer in time (dead, partitioned, or
// without the wiring) keeps its older count, or none. Costs a put and a
// delete of P/ask/holders/<id>, and one write per answering node, and
// nothing when no cached reference holds the package.
func (s *Store) AskHolders(ctx context.Context, id string, wait time.Duration) (Info, error) {
	if err := core.ValidateID(id); err != nil {
		return Info{}, fmt.Errorf("inspect: %w", err)
	}
	if err := s.askHolders(ctx, id, wait); err != nil {
		s.opt.logger.Warn("asking nodes for their holders failed", "id", id, "err", err)
	}
	return s.Inspect(ctx, id)
}

// askHolders puts the request and waits until every cached reference it
// saw was rewritten or deleted, or wait passed.
func (s *Store) askHolders(ctx context.Context, id string, wait time.Duration) error {
	l, err := s.sess.Current(ctx)
	if err != nil {
		return err
	}
	cctx, cancel := s.opCtx(ctx)
	resp, err := s.cli.Get(cctx, s.keys.RefPrefix(id), clientv3.WithPrefix())
	cancel()
	if err != nil {
		return err
	}
	waiting := map[string]bool{}
	own := s.keys.RefPrefix(id) + l.hex + "/" // this store knows its own
	for _, kv := range resp.Kvs {
		if strings.HasPrefix(string(kv.Key), own) {
			continue
		}
		if r, err := decode[refRecord](kv.Value); err == nil && r.Cached {
			waiting[string(kv.Key)] = true
		}
	}
	if len(waiting) == 0 || wait <= 0 {
		return nil
	}
	_, err = s.ask(ctx, l, askHolders, id, resp.Header.Revision, wait, func(ev *clientv3.Event) bool {
		delete(waiting, string(ev.Kv.Key)) // rewritten with its count, or released
		return len(waiting) == 0
	})
	return err
}

// RecordHolders answers EventHoldersRequested: it writes n, the number of
// local jobs that hold the package through this store's cached reference
// to it, into that reference's record, where AskHolders on another host
// reads it. It does nothing if the store holds no cached reference to the
// package.
func (h *Handle) RecordHolders(ctx context.Context, n int) error {
	return h.record(ctx, "record holders", func(r *ref) { r.holders, r.holdersAt = n, time.Now() })
}

// RecordPods writes the Kubernetes pods ("namespace/name") whose volumes
// hold the package through this store's cached reference into that
// reference's record: Inspect on every host shows them, and WatchCluster
// reports the changes (ClusterPodMounted, ClusterPodUnmounted). It does
// nothing if the store holds no cached reference to the package.
func (h *Handle) RecordPods(ctx context.Context, pods []string) error {
	pods = slices.Clone(pods)
	return h.record(ctx, "record pods", func(r *ref) { r.pods = pods })
}

// record applies set to the newest cached reference to the package and
// writes its record again, over the reference's key only.
func (h *Handle) record(ctx context.Context, op string, set func(*ref)) error {
	if h.err != nil {
		return h.fail(op, h.err)
	}
	s := h.s
	s.refs.move.RLock() // the key and lease stay put meanwhile
	defer s.refs.move.RUnlock()
	s.refs.mu.Lock()
	var r *ref
	for _, x := range s.refs.held[h.id] {
		if x.cached && !x.lost {
			r = x
		}
	}
	if r == nil || r.key == "" {
		s.refs.mu.Unlock()
		return nil
	}
	set(r)
	key, lease := r.key, r.lease
	val := mustJSON(refRecord{Host: s.opt.host, PID: s.pid, Since: r.since, Purpose: s.opt.purpose, Cached: true,
		Holders: r.holders, HoldersAt: r.holdersAt, Pods: r.pods})
	s.refs.mu.Unlock()
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	// Only over the reference itself: never bring back a released key.
	_, err := s.cli.Txn(cctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), ">", 0)).
		Then(clientv3.OpPut(key, val, clientv3.WithLease(lease))).
		Commit()
	if err != nil {
		return h.fail(op, err)
	}
	return nil
}

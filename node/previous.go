package node

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"sync"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/internal/keys"
)

// LeasesFile, in the state directory, names the etcd leases of the node
// that runs there. A node that starts where another one crashed (it holds
// the state directory's lock, so that one is dead) ends what the dead
// node's lease kept running: its build records and build locks go at once
// instead of after the TTL, which an etcd leader election in the meantime
// starts over (the farm soak saw builds waiting 30 s behind a node killed
// mid-build). Its references stay until the TTL: jobs that held packages
// through the dead node are reconnecting and take them again, and a pod's
// volume is taken again by the CSI plugin's recovery; until then the old
// references keep those packages.
const LeasesFile = "leases.json"

// runLeases is LeasesFile's content.
type runLeases struct {
	PID int `json:"pid"`
	// Store is the lease of the store's references, locks and build
	// records; Registration that of P/node/<name>/<lease>.
	Store        clientv3.LeaseID `json:"store"`
	Registration clientv3.LeaseID `json:"registration,omitempty"`
}

// leaseRecord writes LeasesFile whenever one of the node's leases changes.
type leaseRecord struct {
	mu   sync.Mutex
	path string
	last runLeases
}

// endPreviousRun ends the attempts of the node that last ran in the state
// directory, if it did not end them itself: it deletes the build records
// and lock keys still on its store lease, and revokes its registration's
// lease. The caller holds the state directory's lock. A failure is logged:
// the keys then expire with the lease.
func (n *Node) endPreviousRun(ctx context.Context) {
	b, err := os.ReadFile(filepath.Join(n.cfg.StateDir, LeasesFile))
	if err != nil {
		return // no previous run, or it could not record its leases
	}
	var prev runLeases
	if err := json.Unmarshal(b, &prev); err != nil {
		n.log.Warn("ignoring an unreadable record of the previous run's leases", "file", LeasesFile, "err", err)
		return
	}
	ended, err := n.endAttempts(ctx, prev.Store)
	if err != nil {
		n.log.Warn("could not end the builds of the node that ran here before; they end with its lease", "pid", prev.PID, "err", err)
	}
	if len(ended) > 0 {
		n.log.Info("ended the builds of the node that ran here before and died (their locks go now, not after the TTL)",
			"pid", prev.PID, "ids", ended)
	}
	if prev.Registration != 0 && prev.Registration != n.reg.current() {
		cctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), n.cfg.OpTimeout)
		defer cancel()
		if _, err := n.cli.Revoke(cctx, prev.Registration); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
			n.log.Debug("could not revoke the previous run's registration; it expires", "err", err)
		}
	}
}

// endAttempts deletes the build records and build-lock keys attached to
// lease, each only while it is still on that lease, and returns the
// packages whose attempts it ended.
func (n *Node) endAttempts(ctx context.Context, lease clientv3.LeaseID) ([]string, error) {
	if lease == 0 || lease == n.store.Lease() {
		return nil, nil
	}
	cctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), n.cfg.OpTimeout)
	defer cancel()
	resp, err := n.cli.TimeToLive(cctx, lease, clientv3.WithAttachedKeys())
	if err != nil || resp.TTL <= 0 {
		return nil, err // gone already
	}
	space := keys.Space{Prefix: n.cfg.Prefix}
	var ended []string
	var errs []error
	for _, k := range resp.Keys {
		p := space.Parse(string(k))
		if p.Kind != keys.Build && p.Kind != keys.Lock {
			continue
		}
		// Only if it is still the dead node's: a new attempt's key is not.
		del, err := n.cli.Txn(cctx).If(clientv3.Compare(clientv3.LeaseValue(string(k)), "=", lease)).
			Then(clientv3.OpDelete(string(k))).Commit()
		switch {
		case err != nil:
			errs = append(errs, err)
		case del.Succeeded && p.Kind == keys.Build:
			ended = append(ended, p.ID)
		}
	}
	return ended, errors.Join(errs...)
}

// recordLeases writes the node's current leases to LeasesFile (replacing
// it whole), if they changed.
func (n *Node) recordLeases() {
	r := &n.leases
	now := runLeases{PID: os.Getpid(), Store: n.store.Lease(), Registration: n.reg.current()}
	r.mu.Lock()
	defer r.mu.Unlock()
	if now == r.last || now.Store == 0 {
		return
	}
	b, _ := json.Marshal(now)
	if err := writeStateFile(r.path, b, 0o600); err != nil {
		n.log.Warn("could not record the node's leases; after a crash the next node waits for their TTL", "err", err)
		return
	}
	r.last = now
}

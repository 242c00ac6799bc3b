package node

import (
	"context"
	"crypto/rand"
	"fmt"
	"net/url"
	"os"
	"path/filepath"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Embedded is a single-member etcd running inside this process, with its
// data in a host-local directory and its client URL a unix socket there.
type Embedded struct {
	// Endpoint is the client URL (unix://…).
	Endpoint string
	etcd     *embed.Etcd
}

// StartEmbedded starts a single-member etcd with data in dir/etcd and client
// and peer sockets dir/etcd.sock and dir/peer.sock, with periodic
// auto-compaction (keep one hour of history), and waits until it serves or
// ctx ends. A restart on the same dir keeps the data (and the cluster ID the
// shared root is bound to). The caller must Close it.
func StartEmbedded(ctx context.Context, dir string) (*Embedded, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	cfg := embed.NewConfig()
	cfg.Name = "granary"
	cfg.Dir = filepath.Join(dir, "etcd")
	client := url.URL{Scheme: "unix", Path: filepath.Join(dir, "etcd.sock")}
	peer := url.URL{Scheme: "unix", Path: filepath.Join(dir, "peer.sock")}
	if len(client.Path) >= MaxSocketPath {
		return nil, fmt.Errorf("socket path %s too long for a unix socket: use a shorter state directory", client.Path)
	}
	cfg.ListenClientUrls = []url.URL{client}
	cfg.AdvertiseClientUrls = []url.URL{client}
	cfg.ListenPeerUrls = []url.URL{peer}
	cfg.AdvertisePeerUrls = []url.URL{peer}
	cfg.InitialCluster = cfg.Name + "=" + peer.String()
	// The cluster ID derives from the member's name, URLs and this token.
	// Without a random token every host's embedded etcd (and a state dir
	// wiped and made again) would get the same cluster ID, and the shared
	// root's binding could not tell two clusters apart. The token only
	// matters when the data directory is created; later starts keep the ID.
	cfg.InitialClusterToken = "granary-" + rand.Text()
	cfg.AutoCompactionMode = embed.CompactorModePeriodic
	cfg.AutoCompactionRetention = "1h"
	// One member on one host: a short election keeps start-up quick.
	cfg.TickMs = 50
	cfg.ElectionMs = 500
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start embedded etcd in %s: %w", dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedded etcd failed: %w", err)
	case <-ctx.Done():
		e.Close()
		return nil, ctx.Err()
	}
	return &Embedded{Endpoint: client.String(), etcd: e}, nil
}

// Done is closed when the server stops on its own or after Close.
func (e *Embedded) Done() <-chan struct{} { return e.etcd.Server.StopNotify() }

// Close stops the server and waits for it.
func (e *Embedded) Close() {
	e.etcd.Close()
	<-e.etcd.Err()
}

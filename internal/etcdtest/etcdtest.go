// Package etcdtest starts a real, embedded, single-member etcd for tests:
// unix sockets under a short temporary directory (so tests never collide on
// ports), fast ticks, fsync off, and a clean shutdown that closes every
// client it handed out before the server.
package etcdtest

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Server is a running embedded etcd member.
type Server struct {
	// Endpoint is the member's client URL (unix://…).
	Endpoint string
	// Dir holds the member's data and its sockets.
	Dir string

	etcd *embed.Etcd

	mu      sync.Mutex
	clients []*clientv3.Client
	closed  bool

	stopOnce sync.Once
}

// Start runs an embedded etcd for the life of t. The server and every
// client from Client are closed by t.Cleanup, clients first.
func Start(t testing.TB) *Server {
	t.Helper()
	s, err := StartServer()
	if err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}

// StartServer runs an embedded etcd outside a test (for example in a child
// process of a test). The caller must Close it.
func StartServer() (*Server, error) {
	// Unix socket paths are limited to ~107 bytes; t.TempDir() paths grow
	// with the test name, so use a short directory of our own.
	dir, err := os.MkdirTemp("", "etcd")
	if err != nil {
		return nil, err
	}
	cfg := embed.NewConfig()
	cfg.Name = "test"
	cfg.Dir = filepath.Join(dir, "data")
	client := url.URL{Scheme: "unix", Path: filepath.Join(dir, "client.sock")}
	peer := url.URL{Scheme: "unix", Path: filepath.Join(dir, "peer.sock")}
	cfg.ListenClientUrls = []url.URL{client}
	cfg.AdvertiseClientUrls = []url.URL{client}
	cfg.ListenPeerUrls = []url.URL{peer}
	cfg.AdvertisePeerUrls = []url.URL{peer}
	cfg.InitialCluster = cfg.Name + "=" + peer.String()
	cfg.TickMs = 10
	cfg.ElectionMs = 100
	cfg.UnsafeNoFsync = true
	cfg.AutoCompactionMode = embed.CompactorModeRevision
	cfg.AutoCompactionRetention = "10000"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start embedded etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		e.Server.Stop()
		e.Close()
		os.RemoveAll(dir)
		return nil, fmt.Errorf("embedded etcd not ready after 30s")
	}
	return &Server{Endpoint: client.String(), Dir: dir, etcd: e}, nil
}

// Client returns a new client of the server, closed with the server.
// Closing it earlier (to simulate a dead host) is allowed.
func (s *Server) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	cli, err := s.NewClient()
	if err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	return cli
}

// NewClient is Client outside a test.
func (s *Server) NewClient() (*clientv3.Client, error) {
	cli, err := clientv3.New(ClientConfig(s.Endpoint))
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.clients = append(s.clients, cli)
	s.mu.Unlock()
	return cli, nil
}

// ClientConfig is the client configuration tests use for endpoint.
func ClientConfig(endpoint string) clientv3.Config {
	return clientv3.Config{
		Endpoints:   []string{endpoint},
		DialTimeout: 2 * time.Second,
		Logger:      zap.NewNop(),
	}
}

// Close closes the clients, then the server, and removes its directory.
func (s *Server) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	clients := s.clients
	s.mu.Unlock()
	for _, c := range clients {
		c.Close() // closing twice is harmless: the test may have killed it
	}
	s.Stop()
	os.RemoveAll(s.Dir)
}

// Stop stops the server but leaves its clients open, as an etcd that went
// away would: their calls then fail by deadline. Safe to call twice.
func (s *Server) Stop() {
	s.stopOnce.Do(func() {
		s.etcd.Close()
		<-s.etcd.Err()
	})
}

// Healthy reports whether the server answers a read within d.
func (s *Server) Healthy(cli *clientv3.Client, d time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	_, err := cli.Get(ctx, "health")
	return err
}

package node_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/granary-build/granary/node"
)

// TestDialNamesQuorumLoss: with 2 of 3 etcd members down, Dial says that
// quorum is lost and which member answered, not "cannot reach etcd".
func TestDialNamesQuorumLoss(t *testing.T) {
	dir, err := os.MkdirTemp("", "q")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	const n = 3
	var peers []string
	cfgs := make([]*embed.Config, n)
	for i := range n {
		c := embed.NewConfig()
		c.Name = fmt.Sprintf("m%d", i)
		c.Dir = filepath.Join(dir, c.Name)
		client := url.URL{Scheme: "unix", Path: filepath.Join(dir, c.Name+".c")}
		peer := url.URL{Scheme: "http", Host: freePort(t)} // peers talk HTTP over TCP
		c.ListenClientUrls, c.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
		c.ListenPeerUrls, c.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
		c.TickMs, c.ElectionMs, c.UnsafeNoFsync = 10, 100, true
		c.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		peers = append(peers, c.Name+"="+peer.String())
		cfgs[i] = c
	}
	members := make([]*embed.Etcd, n)
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i, c := range cfgs {
		c.InitialCluster = strings.Join(peers, ",")
		wg.Add(1)
		go func() {
			defer wg.Done()
			members[i], errs[i] = embed.StartEtcd(c)
		}()
	}
	wg.Wait()
	stop := make([]func(), n)
	for i, e := range members {
		if errs[i] != nil {
			t.Fatalf("start member %d: %v", i, errs[i])
		}
		stop[i] = sync.OnceFunc(e.Close) // embed.Etcd.Close panics when called twice
		t.Cleanup(stop[i])
	}
	for i, e := range members {
		select {
		case <-e.Server.ReadyNotify():
		case <-time.After(60 * time.Second):
			t.Fatalf("member %d not ready", i)
		}
	}

	cfg := node.DefaultConfig()
	cfg.Endpoints = []string{"unix://" + filepath.Join(dir, "m0.c"), "unix://" + filepath.Join(dir, "m1.c"), "unix://" + filepath.Join(dir, "m2.c")}
	cfg.OpTimeout = 2 * time.Second
	cli, err := node.Dial(context.Background(), &cfg)
	if err != nil {
		t.Fatalf("Dial with all members up: %v", err)
	}
	cli.Close()

	stop[1]()
	stop[2]()
	_, err = node.Dial(context.Background(), &cfg)
	if !errors.Is(err, node.ErrNoQuorum) {
		t.Fatalf("Dial with 2 of 3 down = %v, want ErrNoQuorum", err)
	}
	for _, want := range []string{"quorum lost", "answered without a leader: " + cfg.Endpoints[0], "no answer from " + cfg.Endpoints[1]} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Dial error %q does not say %q", err, want)
		}
	}
}

// freePort returns a 127.0.0.1 address that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

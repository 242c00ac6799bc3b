package bench

import (
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// cluster is an embedded etcd cluster of several members in this process,
// on unix sockets, with fsync on (as production runs).
type cluster struct {
	dir       string
	members   []*embed.Etcd
	endpoints []string
}

// startCluster starts n members under a short temporary directory (unix
// socket paths are limited to ~107 bytes) and waits until all are ready.
func startCluster(n int) (*cluster, error) {
	dir, err := os.MkdirTemp("", "farm")
	if err != nil {
		return nil, err
	}
	c := &cluster{dir: dir}
	var initial []string
	cfgs := make([]*embed.Config, n)
	for i := range n {
		cfg := embed.NewConfig()
		cfg.Name = fmt.Sprintf("m%d", i)
		cfg.Dir = filepath.Join(dir, cfg.Name)
		client := url.URL{Scheme: "unix", Path: filepath.Join(dir, cfg.Name+".c")}
		peer := url.URL{Scheme: "unix", Path: filepath.Join(dir, cfg.Name+".p")}
		cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
		cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
		cfg.AutoCompactionMode, cfg.AutoCompactionRetention = embed.CompactorModePeriodic, "1h"
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		initial = append(initial, cfg.Name+"="+peer.String())
		c.endpoints = append(c.endpoints, client.String())
		cfgs[i] = cfg
	}
	for _, cfg := range cfgs {
		cfg.InitialCluster = strings.Join(initial, ",")
		e, err := embed.StartEtcd(cfg)
		if err != nil {
			c.close()
			return nil, fmt.Errorf("start etcd member %s: %w", cfg.Name, err)
		}
		c.members = append(c.members, e)
	}
	for _, e := range c.members {
		select {
		case <-e.Server.ReadyNotify():
		case <-time.After(60 * time.Second):
			c.close()
			return nil, fmt.Errorf("etcd member %s not ready after 60s", e.Config().Name)
		}
	}
	return c, nil
}

func (c *cluster) close() {
	for _, e := range c.members {
		e.Close()
	}
	os.RemoveAll(c.dir)
}

package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// EnableAuth turns on etcd auth at endpoint for the certificates in dir
// (see WriteCerts): user root (CN=root) is the administrator, user granary
// (CN=granary) gets read-write on prefix only. With client-cert-auth, the
// certificate's CN is the user, so neither has a password.
func EnableAuth(ctx context.Context, endpoint, dir, prefix string) error {
	tlsInfo := transport.TLSInfo{
		CertFile:      filepath.Join(dir, CertRoot+".pem"),
		KeyFile:       filepath.Join(dir, CertRoot+"-key.pem"),
		TrustedCAFile: filepath.Join(dir, CertCA),
	}
	tc, err := tlsInfo.ClientConfig()
	if err != nil {
		return err
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, TLS: tc, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	noPassword := &clientv3.UserAddOptions{NoPassword: true}
	steps := []struct {
		what string
		do   func() error
	}{
		{"add user root", func() error { _, err := cli.UserAddWithOptions(ctx, "root", "", noPassword); return err }},
		{"grant root", func() error { _, err := cli.UserGrantRole(ctx, "root", "root"); return err }},
		{"add role granary", func() error { _, err := cli.RoleAdd(ctx, "granary"); return err }},
		{"grant " + prefix, func() error {
			_, err := cli.RoleGrantPermission(ctx, "granary", prefix, clientv3.GetPrefixRangeEnd(prefix), clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		}},
		{"add user granary", func() error { _, err := cli.UserAddWithOptions(ctx, "granary", "", noPassword); return err }},
		{"grant granary", func() error { _, err := cli.UserGrantRole(ctx, "granary", "granary"); return err }},
		{"enable auth", func() error { _, err := cli.AuthEnable(ctx); return err }},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			return fmt.Errorf("e2e auth: %s at %s: %w", s.what, endpoint, err)
		}
	}
	return nil
}

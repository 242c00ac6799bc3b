package cache_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/granary-build/granary/etcdstore/cache"
)

// nginxConf serves root with WebDAV PUT under /cache/, basic auth under
// /basic/, a bearer token under /bearer/, no PUT under /ro/ (405) and 503
// under /flaky/. Everything nginx writes stays in the test's directory.
const nginxConf = `daemon off;
master_process off;
worker_processes 1;
pid {{dir}}/nginx.pid;
error_log {{dir}}/error.log info;
events { worker_connections 64; }
http {
	access_log {{dir}}/access.log;
	client_body_temp_path {{dir}}/client_body;
	proxy_temp_path {{dir}}/proxy;
	fastcgi_temp_path {{dir}}/fastcgi;
	uwsgi_temp_path {{dir}}/uwsgi;
	scgi_temp_path {{dir}}/scgi;
	client_max_body_size 0;
	server {
		listen 127.0.0.1:{{port}};
		root {{dir}}/www;
		location /cache/ {
			dav_methods PUT DELETE;
			create_full_put_path on;
			dav_access user:rw group:r all:r;
		}
		location /basic/ {
			auth_basic "granary";
			auth_basic_user_file {{dir}}/htpasswd;
			dav_methods PUT DELETE;
			create_full_put_path on;
		}
		location /bearer/ {
			if ($http_authorization != "Bearer s3cret-token") { return 401; }
			dav_methods PUT DELETE;
			create_full_put_path on;
		}
		location /ro/ { }
		location /flaky/ { return 503; }
	}
	server {
		listen 127.0.0.1:{{tlsport}} ssl;
		ssl_certificate {{dir}}/server.pem;
		ssl_certificate_key {{dir}}/server-key.pem;
		root {{dir}}/www;
		location /cache/ {
			dav_methods PUT DELETE;
			create_full_put_path on;
		}
	}
}
`

// nginx is a real nginx serving a temporary directory.
type nginx struct {
	url    string // http://127.0.0.1:port
	tlsURL string // https://127.0.0.1:port, certificate for 127.0.0.1 signed by dir/ca.pem
	dir    string // its root is dir/www
}

// startNginx runs nginx (Debian's nginx package has the WebDAV module) on a
// free loopback port for the life of t, or skips t loudly when there is no
// nginx.
func startNginx(t testing.TB) *nginx {
	t.Helper()
	bin, err := exec.LookPath("nginx")
	if err != nil {
		t.Skip("\n\n*** SKIPPED: nginx is not installed, so the HTTP cache is NOT tested against a real server.\n" +
			"*** Install it (apt-get install -y nginx) to run these tests. ***\n\n")
	}
	dir := t.TempDir()
	for _, d := range []string{"www/cache", "www/basic", "www/bearer", "www/ro"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(dir, "htpasswd"), "granary:{PLAIN}open-sesame\n")
	writeCerts(t, dir)
	port, tlsPort := freePort(t), freePort(t)
	conf := strings.NewReplacer("{{dir}}", dir, "{{port}}", fmt.Sprint(port), "{{tlsport}}", fmt.Sprint(tlsPort)).Replace(nginxConf)
	writeFile(t, filepath.Join(dir, "nginx.conf"), conf)
	cmd := exec.Command(bin, "-p", dir, "-c", filepath.Join(dir, "nginx.conf"), "-e", filepath.Join(dir, "error.log"))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	// Ready when the port accepts; a bounded wait, in one place.
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
		if err == nil {
			c.Close()
			break
		}
		select {
		case err := <-exited:
			log, _ := os.ReadFile(filepath.Join(dir, "error.log"))
			t.Fatalf("nginx exited (%v) before it served:\n%s", err, log)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("nginx did not accept on port %d within 15s", port)
		}
	}
	return &nginx{url: fmt.Sprintf("http://127.0.0.1:%d", port), tlsURL: fmt.Sprintf("https://127.0.0.1:%d", tlsPort), dir: dir}
}

func freePort(t testing.TB) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// writeCerts makes a CA (dir/ca.pem) and a server certificate for
// 127.0.0.1 that it signed (dir/server.pem, dir/server-key.pem).
func writeCerts(t testing.TB, dir string) {
	t.Helper()
	key := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	caKey, srvKey := key(), key()
	now := time.Now()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "granary test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	srvTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caTmpl, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(srvKey)
	if err != nil {
		t.Fatal(err)
	}
	for name, block := range map[string]*pem.Block{
		"ca.pem":         {Type: "CERTIFICATE", Bytes: caDER},
		"server.pem":     {Type: "CERTIFICATE", Bytes: srvDER},
		"server-key.pem": {Type: "EC PRIVATE KEY", Bytes: keyDER},
	} {
		writeFile(t, filepath.Join(dir, name), string(pem.EncodeToMemory(block)))
	}
}

// requests counts the requests with method to path prefix in the access
// log, waiting (at most 5s) until there are at least want: nginx logs a
// request just after it sent the answer, so the client can be quicker.
func (n *nginx) requests(t *testing.T, method, prefix string, want int) int {
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := os.ReadFile(filepath.Join(n.dir, "access.log"))
		if err != nil {
			t.Fatal(err)
		}
		got := strings.Count(string(b), `"`+method+" "+prefix)
		if got >= want || time.Now().After(deadline) {
			return got
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func openHTTP(t testing.TB, url string, opts ...cache.Option) *cache.Remote {
	t.Helper()
	r, err := cache.Open(url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func TestHTTPNginx(t *testing.T) {
	n := startNginx(t)
	r := openHTTP(t, n.url+"/cache/granary", cache.WithTempDir(t.TempDir()))
	exerciseRemote(t, r, filepath.Join(n.dir, "www", "cache", "granary"))
}

func TestHTTPSNginx(t *testing.T) {
	n := startNginx(t)
	ctx := context.Background()
	src, rec := published(t)
	for _, tc := range []struct {
		name string
		opts []cache.Option
		ok   bool
	}{
		{"trusted CA file", []cache.Option{cache.WithCAFile(filepath.Join(n.dir, "ca.pem"))}, true},
		{"insecure", []cache.Option{cache.WithInsecureSkipVerify()}, true},
		{"unknown CA", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := openHTTP(t, n.tlsURL+"/cache/", append(tc.opts, cache.WithTempDir(t.TempDir()))...)
			start := time.Now()
			err := r.Store(ctx, "pkg", src, rec)
			if (err == nil) != tc.ok {
				t.Fatalf("Store over HTTPS = %v, want ok=%v", err, tc.ok)
			}
			if err != nil {
				if d := time.Since(start); d > 2*time.Second {
					t.Errorf("a certificate error took %v: it must not be retried", d)
				}
				return
			}
			if ok, err := r.Fetch(ctx, "pkg", t.TempDir()); !ok || err != nil {
				t.Errorf("Fetch over HTTPS = %v, %v; want a hit", ok, err)
			}
		})
	}
}

func TestHTTPAuth(t *testing.T) {
	n := startNginx(t)
	ctx := context.Background()
	src, rec := published(t)
	for _, tc := range []struct {
		name string
		url  string
		opts []cache.Option
		ok   bool
	}{
		{"basic from URL", strings.Replace(n.url, "://", "://granary:open-sesame@", 1) + "/basic/", nil, true},
		{"basic option", n.url + "/basic/", []cache.Option{cache.WithBasicAuth("granary", "open-sesame")}, true},
		{"basic wrong password", n.url + "/basic/", []cache.Option{cache.WithBasicAuth("granary", "nope")}, false},
		{"basic none", n.url + "/basic/", nil, false},
		{"bearer", n.url + "/bearer/", []cache.Option{cache.WithBearerToken("s3cret-token")}, true},
		{"bearer wrong", n.url + "/bearer/", []cache.Option{cache.WithBearerToken("guess")}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := openHTTP(t, tc.url, tc.opts...)
			err := r.Store(ctx, "pkg", src, rec)
			if (err == nil) != tc.ok {
				t.Fatalf("Store = %v, want ok=%v", err, tc.ok)
			}
			if !tc.ok {
				if !strings.Contains(err.Error(), "401") || strings.Contains(err.Error(), "open-sesame") {
					t.Errorf("Store error %q: want a 401 that does not show the password", err)
				}
				_, err := r.Fetch(ctx, "pkg", t.TempDir())
				if err == nil {
					t.Errorf("Fetch without valid credentials succeeded")
				}
				return
			}
			if ok, err := r.Fetch(ctx, "pkg", t.TempDir()); !ok || err != nil {
				t.Errorf("Fetch = %v, %v; want a hit", ok, err)
			}
		})
	}
}

func TestHTTPErrorsAndRetries(t *testing.T) {
	n := startNginx(t)
	ctx := context.Background()
	src, rec := published(t)

	t.Run("405 is not retried", func(t *testing.T) {
		r := openHTTP(t, n.url+"/ro/", cache.WithRetries(3))
		err := r.Store(ctx, "pkg", src, rec)
		if err == nil || !strings.Contains(err.Error(), "405") {
			t.Fatalf("Store to a location without PUT = %v, want a 405 error", err)
		}
		if got := n.requests(t, "PUT", "/ro/", 1); got != 1 {
			t.Errorf("%d PUT requests, want 1 (a 4xx is final)", got)
		}
	})
	t.Run("503 is retried", func(t *testing.T) {
		r := openHTTP(t, n.url+"/flaky/", cache.WithRetries(2))
		_, err := r.Fetch(ctx, "pkg", t.TempDir())
		if err == nil || !strings.Contains(err.Error(), "503") {
			t.Fatalf("Fetch from a 503 location = %v, want a 503 error", err)
		}
		if got := n.requests(t, "GET", "/flaky/", 3); got != 3 {
			t.Errorf("%d GET requests, want 3 (first try and 2 retries)", got)
		}
	})
}

// hangingServer accepts connections and, for each, reads the start of the
// request, writes prefix (if any) and then never answers again. It is a real
// socket, standing in for a server that hangs. The channel gets a value for
// each connection accepted (dropped if nobody takes it).
func hangingServer(t *testing.T, prefix string) (string, <-chan struct{}) {
	accepted := make(chan struct{}, 1)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			select {
			case accepted <- struct{}{}:
			default:
			}
			if prefix == "" {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.Read(make([]byte, 512)) //nolint:errcheck // the start of the request; then the "answer"
				c.Write([]byte(prefix))   //nolint:errcheck // the client may be gone
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return "http://" + ln.Addr().String() + "/", accepted
}

func TestHTTPHangingServerHitsDeadline(t *testing.T) {
	src, rec := published(t)
	for _, tc := range []struct {
		name   string
		prefix string
	}{
		{"no answer", ""},
		{"headers then silence", "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{\"id\":"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			url, _ := hangingServer(t, tc.prefix)
			r := openHTTP(t, url, cache.WithTimeout(300*time.Millisecond), cache.WithRetries(1))
			start := time.Now()
			_, err := r.Fetch(context.Background(), "pkg", t.TempDir())
			if err == nil {
				t.Fatal("Fetch from a hanging server succeeded")
			}
			if tc.prefix == "" {
				// Store too (the PUT may be sent; its answer never comes).
				if serr := r.Store(context.Background(), "pkg", src, rec); serr == nil {
					t.Fatal("Store to a hanging server succeeded")
				}
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("gave up after %v, want a few timeouts of 300ms", d)
			}
			t.Logf("after %v: %v", time.Since(start).Round(time.Millisecond), err)
		})
	}
}

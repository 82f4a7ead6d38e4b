// TLS credentials made with openssl at test (or bench) time, in a temp
// directory, laid out as QEMU's tls-creds-x509 directories: no key is ever
// committed. Two CAs; a destination ("dest.example", also localhost and
// 127.0.0.1) and sources: a good one, one signed by the other CA, an expired
// one, one outside the authz list; a destination with an expired
// certificate; a source that trusts only the other CA; PSK keys files.
import { execFile } from 'node:child_process';
import { copyFile, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

export interface TlsFixtures {
  root: string;
  /** x509 directories (ca-cert.pem + the role's cert and key). */
  dest: string;
  destExpired: string;
  source: string;
  sourceOtherCa: string;
  sourceExpired: string;
  /** A client certificate of the right CA, CN=intruder.example (outside the authz list). */
  sourceIntruder: string;
  /** Trusts only the other CA (so not the destination's certificate). */
  sourceDistrusts: string;
  /** PSK keys files: qemu:<key>; the same username with another key; another username. */
  psk: string;
  pskWrong: string;
  pskOtherUser: string;
  /** The good source's identities, for authz lists. */
  sourceDn: string;
  remove(): Promise<void>;
}

/** openssl's ASN.1 time (YYYYMMDDHHMMSSZ) `days` from now. */
function asn1Time(days: number): string {
  return `${new Date(Date.now() + days * 86_400_000).toISOString().replace(/[-:T]/g, '').slice(0, 14)}Z`;
}

async function openssl(args: string[], cwd: string): Promise<void> {
  try {
    await run('openssl', args, { cwd });
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`openssl ${args.slice(0, 2).join(' ')} failed: ${e.stderr || e.message}`);
  }
}

interface Ca {
  dir: string;
  cert: string;
}

async function makeCa(root: string, name: string): Promise<Ca> {
  const dir = path.join(root, name);
  await mkdir(path.join(dir, 'newcerts'), { recursive: true });
  await writeFile(path.join(dir, 'index.txt'), '');
  await writeFile(path.join(dir, 'serial'), '1000\n');
  // `openssl ca` rather than `x509 -req`: it takes explicit start and end dates (an expired certificate) on OpenSSL 1.1 and 3.x alike.
  await writeFile(
    path.join(dir, 'ca.cnf'),
    `[ ca ]\ndefault_ca = CA_default\n[ CA_default ]\ndir = ${dir}\ndatabase = $dir/index.txt\nnew_certs_dir = $dir/newcerts\nserial = $dir/serial\ndefault_md = sha256\npolicy = policy_any\ncopy_extensions = copy\nunique_subject = no\n[ policy_any ]\norganizationName = optional\ncommonName = supplied\n`,
  );
  await openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '30', '-subj', `/O=Example/CN=${name}`], dir);
  return { dir, cert: path.join(dir, 'ca-cert.pem') };
}

/** A certificate and key signed by `ca`, as `<role>-cert.pem` / `<role>-key.pem` in `out` (with the CA's ca-cert.pem unless `trust` says otherwise). */
async function issue(ca: Ca, out: string, role: 'server' | 'client', cn: string, sans: string[], opts: { expired?: boolean; trust?: Ca } = {}): Promise<void> {
  await mkdir(out, { recursive: true });
  const key = path.join(out, `${role}-key.pem`);
  const csr = path.join(out, `${role}.csr`);
  await openssl(['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', csr, '-subj', `/O=Example/CN=${cn}`, '-addext', `subjectAltName=${sans.join(',')}`], ca.dir);
  const [start, end] = opts.expired ? [asn1Time(-10), asn1Time(-1)] : [asn1Time(-1), asn1Time(30)];
  await openssl(['ca', '-batch', '-notext', '-preserveDN', '-config', 'ca.cnf', '-cert', 'ca-cert.pem', '-keyfile', 'ca-key.pem', '-in', csr, '-out', path.join(out, `${role}-cert.pem`), '-startdate', start, '-enddate', end], ca.dir);
  await rm(csr);
  await copyFile((opts.trust ?? ca).cert, path.join(out, 'ca-cert.pem'));
}

export async function makeTlsFixtures(): Promise<TlsFixtures> {
  const root = await mkdtemp(path.join(os.tmpdir(), 'vfio-mig-tls-'));
  const [ca, other] = await Promise.all([makeCa(root, 'ca'), makeCa(root, 'other-ca')]);
  const dir = (n: string) => path.join(root, n);
  const destSans = ['DNS:dest.example', 'DNS:localhost', 'IP:127.0.0.1'];
  // One CA's database at a time (openssl ca appends to it).
  await issue(ca, dir('dest'), 'server', 'dest.example', destSans);
  await issue(ca, dir('dest-expired'), 'server', 'dest.example', destSans, { expired: true });
  await issue(ca, dir('source'), 'client', 'source.example', ['DNS:source.example']);
  await issue(ca, dir('source-expired'), 'client', 'source.example', ['DNS:source.example'], { expired: true });
  await issue(ca, dir('source-intruder'), 'client', 'intruder.example', ['DNS:intruder.example']);
  await issue(other, dir('source-other-ca'), 'client', 'source.example', ['DNS:source.example'], { trust: ca });
  await issue(ca, dir('source-distrusts'), 'client', 'source.example', ['DNS:source.example'], { trust: other });
  const key = (seed: number) => Buffer.alloc(32, seed).toString('hex');
  await writeFile(dir('keys.psk'), `# test keys\nqemu:${key(0x5a)}\nbackup:${key(0x33)}\n`);
  await writeFile(dir('wrong.psk'), `qemu:${key(0x5b)}\n`);
  await writeFile(dir('other-user.psk'), `mallory:${key(0x5a)}\n`);
  return {
    root,
    dest: dir('dest'),
    destExpired: dir('dest-expired'),
    source: dir('source'),
    sourceOtherCa: dir('source-other-ca'),
    sourceExpired: dir('source-expired'),
    sourceIntruder: dir('source-intruder'),
    sourceDistrusts: dir('source-distrusts'),
    psk: dir('keys.psk'),
    pskWrong: dir('wrong.psk'),
    pskOtherUser: dir('other-user.psk'),
    sourceDn: 'CN=source.example,O=Example',
    remove: () => rm(root, { recursive: true, force: true }),
  };
}

!> Standalone check of `sw_dynamics` against the numpy twin (tests/test_shallow_water.py).
!>
!> Usage: `mpiexec -n NRANKS sw_selftest [NSTEPS [OUTFILE [NX NY [LX_M LY_M]]]]`
!> (defaults: 200 steps, `sw_selftest.bin`, the `sw_params` defaults). Every rank builds its
!> slab of the default initial state, runs NSTEPS RK4 steps, and rank 0 writes a raw
!> float64 stream file holding two global states `state(nx, ny, 3)` (u, v, h): the initial
!> state, then the final one. In numpy: `np.fromfile(f).reshape(2, 3, ny, nx)`.
!> The model communicator is a duplicate of MPI_COMM_WORLD, passed to the module.
program sw_selftest
   use mpi
   use sw_dynamics
   implicit none
   type(sw_params) :: p
   integer :: comm, ierr, rank, nranks, nyl, j0, st, nsteps, n, funit
   real(sw_dp), allocatable :: u(:, :), v(:, :), h(:, :), glob(:, :, :)
   character(len=512) :: arg, outfile
   double precision :: t0, t1

   call MPI_Init(ierr)
   call MPI_Comm_dup(MPI_COMM_WORLD, comm, ierr)

   nsteps = 200
   outfile = 'sw_selftest.bin'
   if (command_argument_count() >= 1) then
      call get_command_argument(1, arg)
      read (arg, *) nsteps
   end if
   if (command_argument_count() >= 2) call get_command_argument(2, outfile)
   if (command_argument_count() >= 4) then
      call get_command_argument(3, arg)
      read (arg, *) p%nx
      call get_command_argument(4, arg)
      read (arg, *) p%ny
   end if
   if (command_argument_count() >= 6) then
      call get_command_argument(5, arg)
      read (arg, *) p%lx_m
      call get_command_argument(6, arg)
      read (arg, *) p%ly_m
   end if

   call sw_decomposition(p, comm, rank, nranks, nyl, j0, st)
   if (st /= 0) then
      if (rank == 0) write (*, '(a,i0,a,i0)') 'sw_selftest: cannot split ny=', p%ny, ' over ranks: ', nranks
      call MPI_Abort(comm, 2, ierr)
   end if

   allocate (u(p%nx, 1 - sw_nh:nyl + sw_nh), v(p%nx, 1 - sw_nh:nyl + sw_nh), &
             h(p%nx, 1 - sw_nh:nyl + sw_nh))
   call sw_default_initial_state(p, j0, nyl, u(:, 1:nyl), v(:, 1:nyl), h(:, 1:nyl))
   if (rank == 0) then
      allocate (glob(p%nx, p%ny, 3))
      open (newunit=funit, file=trim(outfile), access='stream', form='unformatted', &
            status='replace', action='write')
   else
      allocate (glob(1, 1, 3))
   end if

   call gather_state()
   if (rank == 0) write (funit) glob

   call MPI_Barrier(comm, ierr)
   t0 = MPI_Wtime()
   do n = 1, nsteps
      call sw_step(p, comm, u, v, h)
   end do
   t1 = MPI_Wtime()

   call gather_state()
   if (rank == 0) then
      write (funit) glob
      close (funit)
      write (*, '(a,i0,a,i0,a,i0,a,i0,a,es10.3,a)') 'sw_selftest: nx=', p%nx, ' ny=', p%ny, &
         ' ranks=', nranks, ' steps=', nsteps, ' time/step=', (t1 - t0)/max(nsteps, 1), ' s'
      write (*, '(a,es24.16,a,es12.5)') 'sw_selftest: mean h=', sum(glob(:, :, 3))/size(glob(:, :, 3)), &
         ' max|u|=', maxval(abs(glob(:, :, 1)))
   end if

   call MPI_Comm_free(comm, ierr)
   call MPI_Finalize(ierr)

contains

   !> Gather the owned rows of u, v, h into glob(nx, ny, 3) on rank 0 (ranks own
   !> consecutive row blocks, so rank order is row order).
   subroutine gather_state()
      real(sw_dp), allocatable :: sbuf(:, :)
      real(sw_dp), allocatable :: rbuf(:, :)
      integer :: k

      allocate (sbuf(p%nx, nyl))
      if (rank == 0) then
         allocate (rbuf(p%nx, p%ny))
      else
         allocate (rbuf(1, 1))
      end if
      do k = 1, 3
         select case (k)
         case (1)
            sbuf = u(:, 1:nyl)
         case (2)
            sbuf = v(:, 1:nyl)
         case (3)
            sbuf = h(:, 1:nyl)
         end select
         call MPI_Gather(sbuf, p%nx*nyl, MPI_DOUBLE_PRECISION, rbuf, p%nx*nyl, &
                         MPI_DOUBLE_PRECISION, 0, comm, ierr)
         if (rank == 0) glob(:, :, k) = rbuf
      end do
   end subroutine gather_state

end program sw_selftest
